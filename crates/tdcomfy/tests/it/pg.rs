//! A fresh PostgreSQL database per test on the server `TDCOMFY_TEST_DATABASE_URL` names (CI's
//! throwaway cluster). Without it a test prints `SKIPPED: …` and passes, unless
//! `TDCOMFY_REQUIRE_POSTGRES=1` (CI), where that is a failure.

/// A database created for one test, dropped (forcibly: brokers may still hold connections) with it.
pub struct TestDb {
    /// `postgres://…/<name>`.
    pub url: String,
    server: String,
    name: String,
}

impl TestDb {
    pub async fn create(test: &str) -> Option<TestDb> {
        let server = match std::env::var("TDCOMFY_TEST_DATABASE_URL") {
            Ok(url) if !url.trim().is_empty() => url.trim().to_owned(),
            _ => {
                if std::env::var("TDCOMFY_REQUIRE_POSTGRES").is_ok_and(|v| v == "1") {
                    panic!("TDCOMFY_REQUIRE_POSTGRES=1 but TDCOMFY_TEST_DATABASE_URL is not set");
                }
                println!("SKIPPED: {test} needs PostgreSQL (set TDCOMFY_TEST_DATABASE_URL to a server URL)");
                return None;
            }
        };
        // Unique per run and test: parallel tests and a killed run's left-overs never meet.
        let name = format!("tdc_bin_{test}_{}", tdcomfy_api::JobId::new().to_string().replace('-', ""));
        let (client, conn) = tokio_postgres::connect(&server, tokio_postgres::NoTls)
            .await
            .expect("connect to TDCOMFY_TEST_DATABASE_URL");
        tokio::spawn(conn);
        client.batch_execute(&format!("CREATE DATABASE \"{name}\"")).await.expect("CREATE DATABASE");
        let mut url = reqwest::Url::parse(&server).expect("TDCOMFY_TEST_DATABASE_URL is a URL");
        url.set_path(&format!("/{name}"));
        Some(TestDb { url: url.to_string(), server, name })
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let (server, name) = (self.server.clone(), self.name.clone());
        // Drop runs inside the test's runtime, which cannot be blocked on: a thread of its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            rt.block_on(async {
                if let Ok((client, conn)) = tokio_postgres::connect(&server, tokio_postgres::NoTls).await {
                    tokio::spawn(conn);
                    let _ = client.batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)")).await;
                }
            });
        })
        .join();
    }
}
