//! The prompt queue and the history, as `execution.PromptQueue` keeps them.
//!
//! Owns: the pending heap (Python's `heapq` algorithm on `(number, prompt_id)`, so `GET /queue`
//! shows the same heap order ComfyUI does), the one running item, the server counter behind
//! `number`, and the in-memory history (insertion order, capped at 10000). Every queue change
//! broadcasts a `status` event while the lock is held, so status messages can never be reordered.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::Serialize;
use serde::ser::{SerializeMap, SerializeSeq, Serializer};
use tokio::sync::Notify;

use crate::hub::Hub;
use crate::json::{OMap, OValue, OrderedPairs};

const MAXIMUM_HISTORY_SIZE: usize = 10_000;

/// The queue position of a prompt: the server counter (an int) or a client-given float.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum QueueNumber {
    /// from the server counter (negative with `front`)
    Counter(i64),
    /// sent by the client as `number`
    Given(f64),
}

impl QueueNumber {
    fn key(self) -> f64 {
        match self {
            QueueNumber::Counter(n) => n as f64,
            QueueNumber::Given(f) => f,
        }
    }

    /// As JSON.
    pub fn to_ovalue(self) -> OValue {
        match self {
            QueueNumber::Counter(n) => OValue::Number(n.into()),
            QueueNumber::Given(f) => serde_json::Number::from_f64(f).map_or(OValue::Null, OValue::Number),
        }
    }
}

/// One queued prompt: `(number, prompt_id, prompt, extra_data, outputs_to_execute)`.
#[derive(Debug, Clone)]
pub struct QueueItem {
    /// queue position
    pub number: QueueNumber,
    /// the prompt id
    pub prompt_id: String,
    /// the API graph as validated (literal inputs already converted)
    pub graph: Arc<OMap>,
    /// `extra_data` including `client_id`
    pub extra_data: Arc<OMap>,
    /// the output nodes that passed validation
    pub outputs: Arc<Vec<String>>,
}

impl QueueItem {
    /// The `client_id` the prompt's events are routed to.
    pub fn client_id(&self) -> Option<String> {
        self.extra_data.get("client_id").map(OValue::py_str)
    }

    /// Python tuple ordering `(number, prompt_id)`.
    fn less_than(&self, other: &QueueItem) -> bool {
        let (a, b) = (self.number.key(), other.number.key());
        a < b || (a == b && self.prompt_id < other.prompt_id)
    }
}

impl Serialize for QueueItem {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut seq = serializer.serialize_seq(Some(5))?;
        seq.serialize_element(&self.number.to_ovalue())?;
        seq.serialize_element(&self.prompt_id)?;
        seq.serialize_element(&*self.graph)?;
        seq.serialize_element(&*self.extra_data)?;
        seq.serialize_element(&*self.outputs)?;
        seq.end()
    }
}

/// `status` of a history entry.
#[derive(Debug, Clone, Serialize)]
pub struct ExecutionStatus {
    /// `success` or `error` (an interrupt is an error too)
    pub status_str: &'static str,
    /// true only on success
    pub completed: bool,
    /// `[event, data]` pairs: start, cached and the terminal event
    pub messages: Vec<(String, OValue)>,
}

/// A finished prompt as `/history` returns it.
#[derive(Debug, Clone)]
pub struct HistoryEntry {
    /// the queue item
    pub item: QueueItem,
    /// UI outputs per node id, in output order
    pub outputs: Vec<(String, OValue)>,
    /// the status block
    pub status: ExecutionStatus,
    /// `meta` per output node id
    pub meta: Vec<(String, OValue)>,
}

impl Serialize for HistoryEntry {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(4))?;
        map.serialize_entry("prompt", &self.item)?;
        map.serialize_entry("outputs", &OrderedPairs(&self.outputs))?;
        map.serialize_entry("status", &self.status)?;
        map.serialize_entry("meta", &OrderedPairs(&self.meta))?;
        map.end()
    }
}

/// One consistent look at the queue and the history (see [`PromptQueue::jobs_view`]).
pub struct JobsView {
    /// the running prompt, if any
    pub running: Vec<QueueItem>,
    /// pending prompts in heap order
    pub pending: Vec<QueueItem>,
    /// finished prompts in completion order
    pub history: Vec<(String, Arc<HistoryEntry>)>,
}

#[derive(Default)]
struct State {
    heap: Vec<QueueItem>,
    running: Option<QueueItem>,
    counter: i64,
    history: HashMap<String, Arc<HistoryEntry>>,
    history_order: VecDeque<String>,
}

impl State {
    fn remaining(&self) -> usize {
        self.heap.len() + usize::from(self.running.is_some())
    }

    fn sift_down(&mut self, start: usize, mut pos: usize) {
        let heap = &mut self.heap;
        while pos > start {
            let parent = (pos - 1) >> 1;
            if heap[pos].less_than(&heap[parent]) {
                heap.swap(pos, parent);
                pos = parent;
            } else {
                break;
            }
        }
    }

    fn sift_up(&mut self, mut pos: usize) {
        let end = self.heap.len();
        let start = pos;
        let mut child = 2 * pos + 1;
        while child < end {
            let right = child + 1;
            if right < end && !self.heap[child].less_than(&self.heap[right]) {
                child = right;
            }
            self.heap.swap(pos, child);
            pos = child;
            child = 2 * pos + 1;
        }
        self.sift_down(start, pos);
    }

    fn push(&mut self, item: QueueItem) {
        self.heap.push(item);
        let last = self.heap.len() - 1;
        self.sift_down(0, last);
    }

    fn pop(&mut self) -> Option<QueueItem> {
        let last = self.heap.pop()?;
        if self.heap.is_empty() {
            return Some(last);
        }
        let top = std::mem::replace(&mut self.heap[0], last);
        self.sift_up(0);
        Some(top)
    }

    fn heapify(&mut self) {
        for i in (0..self.heap.len() / 2).rev() {
            self.sift_up(i);
        }
    }
}

/// The shared queue.
pub struct PromptQueue {
    state: Mutex<State>,
    wake: Notify,
    hub: Arc<Hub>,
}

impl PromptQueue {
    /// An empty queue that announces changes on `hub`.
    pub fn new(hub: Arc<Hub>) -> Self {
        Self { state: Mutex::new(State::default()), wake: Notify::new(), hub }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock would be a bug; keep serving with the data as it is.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn announce(&self, state: &State) {
        self.hub.broadcast_status(state.remaining());
    }

    /// The `number` for a new prompt. Like ComfyUI, the counter advances for every POST
    /// without an explicit number, even if the prompt is then rejected.
    pub fn next_number(&self, front: bool) -> QueueNumber {
        let mut st = self.lock();
        let n = st.counter;
        st.counter += 1;
        QueueNumber::Counter(if front { -n } else { n })
    }

    /// Queues an item.
    pub fn put(&self, item: QueueItem) {
        let mut st = self.lock();
        st.push(item);
        self.announce(&st);
        drop(st);
        self.wake.notify_one();
    }

    /// Waits for the next item and marks it running.
    pub async fn next(&self) -> QueueItem {
        loop {
            {
                let mut st = self.lock();
                if let Some(item) = st.pop() {
                    st.running = Some(item.clone());
                    self.announce(&st);
                    return item;
                }
            }
            self.wake.notified().await;
        }
    }

    /// Finishes the running item and records it in the history.
    pub fn task_done(&self, entry: HistoryEntry) {
        let mut st = self.lock();
        st.running = None;
        if st.history.len() > MAXIMUM_HISTORY_SIZE
            && let Some(oldest) = st.history_order.pop_front()
        {
            st.history.remove(&oldest);
        }
        let id = entry.item.prompt_id.clone();
        if st.history.insert(id.clone(), Arc::new(entry)).is_some() {
            st.history_order.retain(|k| *k != id);
        }
        st.history_order.push_back(id);
        self.announce(&st);
    }

    /// Drops everything, like a restarted ComfyUI process: queue, running item, history, counter.
    pub fn restart(&self) {
        let mut st = self.lock();
        *st = State::default();
    }

    /// Number of pending plus running prompts.
    pub fn remaining(&self) -> usize {
        self.lock().remaining()
    }

    /// The id of the running prompt.
    pub fn running_id(&self) -> Option<String> {
        self.lock().running.as_ref().map(|i| i.prompt_id.clone())
    }

    /// `(running, pending in heap order)`.
    pub fn snapshot(&self) -> (Vec<QueueItem>, Vec<QueueItem>) {
        let st = self.lock();
        (st.running.iter().cloned().collect(), st.heap.clone())
    }

    /// Empties the pending queue.
    pub fn wipe(&self) {
        let mut st = self.lock();
        st.heap.clear();
        self.announce(&st);
    }

    /// Removes one pending item by id. Returns whether it was found.
    pub fn delete(&self, prompt_id: &str) -> bool {
        let mut st = self.lock();
        let Some(pos) = st.heap.iter().position(|i| i.prompt_id == prompt_id) else {
            return false;
        };
        if st.heap.len() == 1 {
            // ComfyUI calls wipe_queue() here, which announces once more.
            st.heap.clear();
            self.announce(&st);
        } else {
            st.heap.remove(pos);
            st.heapify();
        }
        self.announce(&st);
        true
    }

    /// Cancels a prompt atomically (0.38's `POST /api/jobs/{id}/cancel`): a pending one leaves the
    /// queue; for the running one `interrupt` is called while the lock is held, so the prompt can
    /// neither finish nor be replaced between the check and the interrupt.
    pub fn cancel(&self, prompt_id: &str, interrupt: impl FnOnce()) -> bool {
        let mut st = self.lock();
        if st.running.as_ref().is_some_and(|r| r.prompt_id == prompt_id) {
            interrupt();
            return true;
        }
        let Some(pos) = st.heap.iter().position(|i| i.prompt_id == prompt_id) else {
            return false;
        };
        st.heap.remove(pos);
        st.heapify();
        self.announce(&st);
        true
    }

    /// Everything the jobs API lists: `(running, pending, history in completion order)`, taken
    /// under one lock so a prompt is never in two lists or none.
    pub fn jobs_view(&self) -> JobsView {
        let st = self.lock();
        let history =
            st.history_order.iter().filter_map(|id| st.history.get(id).map(|e| (id.clone(), e.clone()))).collect();
        JobsView { running: st.running.iter().cloned().collect(), pending: st.heap.clone(), history }
    }

    /// The history entry of one prompt.
    pub fn history_get(&self, prompt_id: &str) -> Option<Arc<HistoryEntry>> {
        self.lock().history.get(prompt_id).cloned()
    }

    /// History entries in completion order; `max_items` without `offset` gives the last ones.
    pub fn history_list(&self, max_items: Option<i64>, offset: Option<i64>) -> Vec<(String, Arc<HistoryEntry>)> {
        let st = self.lock();
        let len = st.history_order.len() as i64;
        let mut offset = offset.unwrap_or(-1);
        if offset < 0
            && let Some(max) = max_items
        {
            offset = len - max;
        }
        let mut out = Vec::new();
        for (i, id) in st.history_order.iter().enumerate() {
            if i as i64 >= offset {
                if let Some(entry) = st.history.get(id) {
                    out.push((id.clone(), entry.clone()));
                }
                if max_items.is_some_and(|m| out.len() as i64 >= m) {
                    break;
                }
            }
        }
        out
    }

    /// Deletes history entries.
    pub fn history_delete(&self, prompt_id: &str) {
        let mut st = self.lock();
        if st.history.remove(prompt_id).is_some() {
            st.history_order.retain(|k| k != prompt_id);
        }
    }

    /// Clears the history.
    pub fn history_clear(&self) {
        let mut st = self.lock();
        st.history.clear();
        st.history_order.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(number: QueueNumber, id: &str) -> QueueItem {
        QueueItem {
            number,
            prompt_id: id.to_string(),
            graph: Arc::new(OMap::new()),
            extra_data: Arc::new(OMap::new()),
            outputs: Arc::new(vec![]),
        }
    }

    #[test]
    fn heap_order_matches_python_heapq() {
        let q = PromptQueue::new(Arc::new(Hub::new()));
        q.put(item(QueueNumber::Counter(20), "a"));
        q.put(item(QueueNumber::Counter(21), "b"));
        q.put(item(QueueNumber::Counter(-22), "c"));
        q.put(item(QueueNumber::Given(1000.5), "d"));
        let numbers = |q: &PromptQueue| -> Vec<f64> { q.snapshot().1.iter().map(|i| i.number.key()).collect() };
        assert_eq!(numbers(&q), [-22.0, 21.0, 20.0, 1000.5]);
        assert!(q.delete("b"));
        assert_eq!(numbers(&q), [-22.0, 20.0, 1000.5]);
        let mut st = q.lock();
        let order: Vec<f64> = std::iter::from_fn(|| st.pop()).map(|i| i.number.key()).collect();
        assert_eq!(order, [-22.0, 20.0, 1000.5]);
    }
}
