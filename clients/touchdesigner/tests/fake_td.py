"""A fake of exactly the part of TouchDesigner's Python API that the tdcomfy component uses.

Every class, member and signature here follows a Derivative documentation page; `fake_td.md` next
to this file lists each one with its page, so a reader can check the fake against TouchDesigner.
Where the documentation leaves a behaviour open (touchdesigner-api.md §12), the fake takes the
strict reading and says so in the table ("[unverified]").

What the fake adds for the tests, and TouchDesigner does not have, starts with `fake_` or is on
`FakeTD` (the application: frame loop, operator table, main-thread guard). Every TD object method
checks that it runs on the main thread (the thread that made the `FakeTD`) and records a violation
otherwise (https://docs.derivative.ca/Python: "Python threads don't have access to TouchDesigner
objects"; real TD may crash instead, the fake makes it a test failure).
"""

from __future__ import annotations

import enum
import inspect
import math
import re
import struct
import threading
import time
import types
import zlib
from pathlib import Path

from td_helpers import mp4_info

# ---------------------------------------------------------------------------------------------
# Errors, modes
# ---------------------------------------------------------------------------------------------


class tdError(Exception):  # noqa: N801 - TouchDesigner's name (td.tdError)
    """td.tdError: the exception TouchDesigner raises for bad API use (its base class is [unverified])."""


class ParMode(enum.Enum):
    """td.ParMode (https://docs.derivative.ca/Par_Class, member ``mode``); that it is an enum.Enum
    is [unverified]: the component reads only the member's name."""

    CONSTANT = 0
    EXPRESSION = 1
    EXPORT = 2
    BIND = 3


_ENCODED: dict = {}
_CUSTOM_NAME = re.compile(r"^[A-Z][a-z0-9]*$")  # touchdesigner-api.md §2.3, the strict reading


# ---------------------------------------------------------------------------------------------
# Images the fake TOPs produce (a real PNG and a real baseline JPEG, standard library only)
# ---------------------------------------------------------------------------------------------


def png_gray(width: int, height: int, level: int) -> bytes:
    rows = b"".join(b"\x00" + bytes([level]) * width for _ in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def jpeg_gray(width: int, height: int, level_of_block) -> bytes:
    """A baseline grayscale JPEG whose 8x8 blocks are flat (only DC coefficients are coded).

    Its own Huffman tables: DC categories 0..11 as 4-bit codes, AC only end-of-block ("0").
    ``level_of_block(bx, by)`` gives each block's grey level 0..255.
    """

    def segment(marker: int, payload: bytes) -> bytes:
        return bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload

    out = bytearray(b"\xff\xd8")
    out += segment(0xE0, b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00")
    out += segment(0xDB, b"\x00" + bytes([1] * 64))
    out += segment(0xC0, struct.pack(">BHHB", 8, height, width, 1) + bytes([1, 0x11, 0]))
    dc_bits = [0] * 16
    dc_bits[3] = 12
    out += segment(0xC4, bytes([0x00]) + bytes(dc_bits) + bytes(range(12)))
    ac_bits = [0] * 16
    ac_bits[0] = 1
    out += segment(0xC4, bytes([0x10]) + bytes(ac_bits) + b"\x00")
    out += segment(0xDA, bytes([1, 1, 0x00, 0, 63, 0]))
    bits: list[int] = []

    def put(value: int, count: int) -> None:
        bits.extend((value >> (count - 1 - i)) & 1 for i in range(count))

    previous = 0
    for by in range(math.ceil(height / 8)):
        for bx in range(math.ceil(width / 8)):
            dc = 8 * (max(0, min(255, int(level_of_block(bx, by)))) - 128)  # F(0,0) of a flat block
            diff, previous = dc - previous, dc
            size = abs(diff).bit_length()
            put(size, 4)
            if size:
                put(diff if diff > 0 else diff + (1 << size) - 1, size)
            put(0, 1)  # end of block
    bits.extend([1] * (-len(bits) % 8))
    data = bytearray()
    for i in range(0, len(bits), 8):
        byte = int("".join(map(str, bits[i : i + 8])), 2)
        data.append(byte)
        if byte == 0xFF:
            data.append(0x00)  # byte stuffing
    return bytes(out + data + b"\xff\xd9")


# ---------------------------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------------------------


class Par:
    """td.Par (https://docs.derivative.ca/Par_Class)."""

    def __init__(self, owner: OP, name: str, style: str, *, custom: bool, label: str | None = None,
                 value=None, menu: list[str] | None = None) -> None:
        self._owner, self._name, self._style, self._custom = owner, name, style, custom
        self._label = label if label is not None else name
        self._val = value if value is not None else _zero(style)
        self._default = self._val
        self._expr = ""
        self._mode = ParMode.CONSTANT
        self._min = self._max = None
        self._norm = [0.0, 1.0]
        self._clamp = [False, False]
        self._menu_names = list(menu) if menu is not None else ([] if style in ("Menu", "StrMenu") else None)
        self._menu_labels = list(self._menu_names) if self._menu_names is not None else None
        self._help = ""
        self.readOnly = False  # noqa: N815 - blocks the UI only, scripts still set the value
        self.page: Page | None = None
        self._valid = True

    # identity
    name = property(lambda self: self._name)
    owner = property(lambda self: self._owner)
    style = property(lambda self: self._style)
    valid = property(lambda self: self._valid)
    isCustom = property(lambda self: self._custom)  # noqa: N815
    isPulse = property(lambda self: self._style in ("Pulse", "Momentary"))  # noqa: N815
    isToggle = property(lambda self: self._style == "Toggle")  # noqa: N815
    isMenu = property(lambda self: self._style in ("Menu", "StrMenu"))  # noqa: N815
    isString = property(lambda self: self._style in ("Str", "StrMenu"))  # noqa: N815
    isInt = property(lambda self: self._style == "Int")  # noqa: N815
    isFloat = property(lambda self: self._style == "Float")  # noqa: N815
    isNumber = property(lambda self: self._style in ("Int", "Float"))  # noqa: N815

    def _td(self) -> FakeTD:
        return self._owner._td

    # value
    @property
    def val(self):
        self._td().check_thread("Par.val")
        return self._val

    @val.setter
    def val(self, value) -> None:
        td = self._td()
        td.check_thread("Par.val")
        if not self._valid:
            raise tdError("Invalid Par object")
        previous = self.eval()
        self._val = self._coerce(value)
        self._mode = ParMode.CONSTANT
        if self.eval() != previous:
            td.fake_par_changed(self, previous)

    @property
    def expr(self) -> str:
        return self._expr

    @expr.setter
    def expr(self, text: str) -> None:
        self._td().check_thread("Par.expr")
        self._expr = str(text)
        self._mode = ParMode.EXPRESSION

    @property
    def mode(self):
        return self._mode

    def eval(self):
        td = self._td()
        td.check_thread("Par.eval")
        if self._mode == ParMode.EXPRESSION:
            namespace = {"me": self._owner, "op": _expression_op(self._owner), "absTime": td.absTime}
            return self._coerce(eval(self._expr, namespace))
        value = self._val
        if self._style in ("Int", "Float"):
            if self._clamp[0] and self._min is not None:
                value = max(self._min, value)
            if self._clamp[1] and self._max is not None:
                value = min(self._max, value)
            value = int(value) if self._style == "Int" else float(value)
        return value

    def _coerce(self, value):
        style = self._style
        if isinstance(value, Par):
            value = value.eval()
        if style == "Int":
            return int(round(float(value)))
        if style == "Float":
            return float(value)
        if style in ("Toggle", "Pulse", "Momentary"):
            return bool(value)
        if style == "Menu":
            if isinstance(value, int) and not isinstance(value, bool):
                return self._menu_names[value]
            return str(value)  # a name not (yet) in the menu is kept as given [unverified]
        return "" if value is None else str(value)

    # custom-only attributes ("Can only be set on Custom Parameters")
    def _custom_only(self, what: str) -> None:
        self._td().check_thread(f"Par.{what}")
        if not self._custom:
            raise tdError(f"Custom parameter expected. ({self._owner.path}:{self._name}.{what})")

    def _setter(attr: str, index: int | None = None):  # noqa: N805 - a property factory
        def get(self):
            return getattr(self, attr) if index is None else getattr(self, attr)[index]

        def put(self, value):
            self._custom_only(attr.strip("_"))
            if index is None:
                setattr(self, attr, value)
            else:
                getattr(self, attr)[index] = value

        return property(get, put)

    min = _setter("_min")
    max = _setter("_max")
    normMin = _setter("_norm", 0)  # noqa: N815
    normMax = _setter("_norm", 1)  # noqa: N815
    clampMin = _setter("_clamp", 0)  # noqa: N815
    clampMax = _setter("_clamp", 1)  # noqa: N815
    help = _setter("_help")
    label = _setter("_label")

    @property
    def default(self):
        return self._default

    @default.setter
    def default(self, value) -> None:
        self._custom_only("default")
        self._default = self._coerce(value)  # does not change the current value

    @property
    def menuNames(self):  # noqa: N802
        return None if self._menu_names is None else list(self._menu_names)

    @menuNames.setter
    def menuNames(self, names) -> None:  # noqa: N802
        self._custom_only("menuNames")
        self._menu_names = [str(n) for n in names]

    @property
    def menuLabels(self):  # noqa: N802
        return None if self._menu_labels is None else list(self._menu_labels)

    @menuLabels.setter
    def menuLabels(self, labels) -> None:  # noqa: N802
        self._custom_only("menuLabels")
        self._menu_labels = [str(n) for n in labels]

    @property
    def menuIndex(self) -> int:  # noqa: N802
        names = self._menu_names or []
        return names.index(self.eval()) if self.eval() in names else 0

    def pulse(self, value=1, frames=0, seconds=0) -> None:
        """Pulse parameters act at once and call Parameter Execute DATs' onPulse (synchronously)."""
        td = self._td()
        td.check_thread("Par.pulse")
        if self.isPulse:
            self._owner.fake_on_pulse(self)
            td.fake_dispatch_pulse(self)
            return
        previous = self._val
        self.val = value
        self._val = previous  # restored once the operator cooked (frames/seconds not modelled)

    # casting: "a Par acts as its value in numeric and string contexts"
    def __float__(self) -> float:
        return float(self.eval())

    def __int__(self) -> int:
        return int(self.eval())

    def __str__(self) -> str:
        return str(self.eval())

    def __bool__(self) -> bool:
        return bool(self.eval())

    def __repr__(self) -> str:
        return f"type:Par name:{self._name} owner:{self._owner.path} value:{self._val!r}"


def _zero(style: str):
    return {"Int": 0, "Float": 0.0, "Toggle": False, "Pulse": False, "Momentary": False}.get(style, "")


class ParGroup:
    """td.ParGroup (https://docs.derivative.ca/ParGroup_Class): what every Page.append* returns."""

    def __init__(self, pars: list[Par]) -> None:
        self._pars = pars

    def __getitem__(self, index: int) -> Par:
        return self._pars[index]

    def __iter__(self):
        return iter(self._pars)

    def __len__(self) -> int:
        return len(self._pars)

    name = property(lambda self: self._pars[0].name)
    size = property(lambda self: len(self._pars))


class ParCollection:
    """td.ParCollection (https://docs.derivative.ca/ParCollection_Class): ``op.par``."""

    def __init__(self, owner: OP) -> None:
        object.__setattr__(self, "_owner", owner)
        object.__setattr__(self, "_pars", {})

    def __getattr__(self, name: str) -> Par:
        pars = object.__getattribute__(self, "_pars")
        if name in pars:
            object.__getattribute__(self, "_owner")._td.check_thread("ParCollection")
            return pars[name]
        raise AttributeError(f"'td.ParCollection' object has no attribute '{name}'")

    def __setattr__(self, name: str, value) -> None:
        # `op.par.X = 5` is the same as `op.par.X.val = 5` (Par_Class, val).
        getattr(self, name).val = value

    def __getitem__(self, name: str) -> Par | None:
        return object.__getattribute__(self, "_pars").get(name)

    def fake_add(self, par: Par) -> None:
        object.__getattribute__(self, "_pars")[par.name] = par

    def fake_remove(self, name: str) -> None:
        par = object.__getattribute__(self, "_pars").pop(name, None)
        if par is not None:
            par._valid = False


class Page:
    """td.Page (https://docs.derivative.ca/Page_Class), made by COMP.appendCustomPage."""

    def __init__(self, owner: COMP, name: str) -> None:
        self.owner = owner
        self.name = name
        self._pars: list[Par] = []
        self.isCustom = True  # noqa: N815

    @property
    def pars(self) -> list[Par]:
        return list(self._pars)

    @property
    def index(self) -> int:
        return self.owner.customPages.index(self)

    def __len__(self) -> int:
        return len(self._pars)

    def __getitem__(self, i: int) -> Par:
        return self._pars[i]

    def destroy(self) -> None:
        self.owner._td.check_thread("Page.destroy")
        for par in self._pars:
            self.owner.par.fake_remove(par.name)
        self._pars = []
        self.owner._pages.remove(self)

    def _append(self, style: str, name: str, label, order, replace, size: int = 1) -> ParGroup:
        td = self.owner._td
        td.check_thread(f"Page.append{style}")
        if not _CUSTOM_NAME.match(name):
            raise tdError(f"Invalid custom parameter name: {name!r} (first letter upper case, the rest lower case)")
        if not 1 <= size <= 4:
            raise tdError("The maximum size for any parameter is 4")
        names = [name] if size == 1 else [f"{name}{i}" for i in range(1, size + 1)]
        pars = []
        for par_name in names:
            existing = self.owner.par[par_name]
            if existing is not None:
                if not replace:
                    raise tdError(f"Parameter already exists: {par_name}")
                existing.page._pars.remove(existing)
                self.owner.par.fake_remove(par_name)
            par = Par(self.owner, par_name, style, custom=True, label=label if label is not None else name)
            par.page = self
            self.owner.par.fake_add(par)
            pars.append(par)
        self._pars.extend(pars)
        return ParGroup(pars)

    # Signatures: https://docs.derivative.ca/Page_Class (the same in the 2023 text).
    def appendInt(self, name, label=None, size=1, order=None, replace=True):  # noqa: N802
        return self._append("Int", name, label, order, replace, size)

    def appendFloat(self, name, label=None, size=1, order=None, replace=True):  # noqa: N802
        return self._append("Float", name, label, order, replace, size)

    def appendStr(self, name, label=None, order=None, replace=True):  # noqa: N802
        return self._append("Str", name, label, order, replace)

    def appendToggle(self, name, label=None, order=None, replace=True):  # noqa: N802
        return self._append("Toggle", name, label, order, replace)

    def appendPulse(self, name, label=None, order=None, replace=True):  # noqa: N802
        return self._append("Pulse", name, label, order, replace)

    def appendMenu(self, name, label=None, order=None, replace=True):  # noqa: N802
        return self._append("Menu", name, label, order, replace)


# ---------------------------------------------------------------------------------------------
# Operators
# ---------------------------------------------------------------------------------------------


class Connector:
    """td.Connector (https://docs.derivative.ca/Connector_Class)."""

    def __init__(self, owner: OP, index: int, is_input: bool) -> None:
        self.owner, self.index, self.isInput = owner, index, is_input  # noqa: N815
        self.isOutput = not is_input  # noqa: N815
        self._source: OP | None = None

    @property
    def connections(self) -> list:
        return [self._source] if self._source is not None else []

    def connect(self, target) -> None:
        """An input connector's connection is replaced with the target."""
        self.owner._td.check_thread("Connector.connect")
        if not self.isInput:
            raise tdError("only input connectors are modelled")
        self._source = target.owner if isinstance(target, Connector) else target

    def disconnect(self) -> None:
        self._source = None


class _Ext:
    """``OP.ext``: "searches up the network hierarchy for the named extension" (OP_Class)."""

    def __init__(self, start: OP) -> None:
        self._start = start

    def __getattr__(self, name: str):
        node = self._start
        while node is not None:
            for ext_name, instance in getattr(node, "_extensions", []):
                if name in (ext_name, type(instance).__name__):
                    return instance
            node = node._parent
        raise AttributeError(f"no extension named {name!r} above {self._start.path}")


class OP:
    """td.OP (https://docs.derivative.ca/OP_Class): what every operator has."""

    OPType = "OP"
    family = "OP"
    builtin_pars: dict = {}

    def __init__(self, td: FakeTD, parent: COMP | None, name: str) -> None:
        self._td = td
        self._parent = parent
        self._name = name
        self._valid = True
        self.par = ParCollection(self)
        for par_name, (style, value) in self.builtin_pars.items():
            self.par.fake_add(Par(self, par_name, style, custom=False, value=value))
        self.storage: dict = {}
        self._script_errors: list[str] = []
        self.inputConnectors = [Connector(self, i, True) for i in range(self.fake_inputs)]  # noqa: N815
        self.nodeX = self.nodeY = 0  # noqa: N815
        self.totalCooks = 0  # noqa: N815

    fake_inputs = 0

    name = property(lambda self: self._name)
    valid = property(lambda self: self._valid)
    opType = property(lambda self: self.OPType)  # noqa: N815 - the 2025 page's spelling
    isCOMP = property(lambda self: self.family == "COMP")  # noqa: N815

    @property
    def path(self) -> str:
        if self._parent is None:
            return "/"
        return f"{self._parent.path.rstrip('/')}/{self._name}"

    @property
    def inputs(self) -> list:
        return [c._source for c in self.inputConnectors if c._source is not None]

    @property
    def ext(self) -> _Ext:
        return _Ext(self)

    def parent(self, n: int = 1):
        node = self
        for _ in range(n):
            node = node._parent
            if node is None:
                return None
        return node

    def op(self, path: str):
        """Relative to the inside of this operator for a COMP; from any other operator a name is a
        sibling and ``..`` its parent COMP (DAT scripts "run from the parent of the DAT")."""
        self._td.check_thread("OP.op")
        return self._td.fake_resolve(self, str(path))

    def fetch(self, key, default=None, search=True, storeDefault=False):  # noqa: N803
        self._td.check_thread("OP.fetch")
        node = self
        while node is not None:
            if key in node.storage:
                return node.storage[key]
            if not search:
                break
            node = node._parent
        if storeDefault:
            self.storage[key] = default
        return default

    def store(self, key, value):
        self._td.check_thread("OP.store")
        self.storage[key] = value
        return value

    def unstore(self, keys1, *morekeys) -> None:
        for key in (keys1, *morekeys):
            self.storage.pop(key, None)

    def addScriptError(self, msg: str) -> None:  # noqa: N802
        self._td.check_thread("OP.addScriptError")
        self._script_errors.append(str(msg))

    def clearScriptErrors(self, recurse=False, error="*") -> None:  # noqa: N802
        self._td.check_thread("OP.clearScriptErrors")
        self._script_errors = []

    def scriptErrors(self, recurse=False) -> str:  # noqa: N802
        return "\n".join(self._script_errors)

    def cook(self, force=False, recurse=False, includeUtility=False) -> None:  # noqa: N803
        self._td.check_thread("OP.cook")
        self.totalCooks += 1

    def destroy(self) -> None:
        if not self._valid:
            raise tdError("Invalid OP object")
        self._td.check_thread("OP.destroy")
        self._valid = False
        if self._parent is not None:
            del self._parent._children[self._name]

    def fake_on_pulse(self, par: Par) -> None:
        """What a built-in pulse parameter does (per operator type)."""

    def __repr__(self) -> str:
        return f"type:{self.OPType} path:{self.path}"


def _expression_op(owner: OP):
    """``op`` in a parameter expression: on a COMP a bare ``op('x')`` is a sibling of the COMP and
    ``op('./x')`` a child (touchdesigner-api.md §1.2); on other operators, their ``op``."""
    if owner.family != "COMP":
        return owner.op

    def find(path: str):
        path = str(path)
        if path.startswith("./"):
            return owner.op(path[2:])
        return owner._parent.op(path) if owner._parent is not None else owner.op(path)

    return find


class COMP(OP):
    """td.COMP / td.baseCOMP (https://docs.derivative.ca/COMP_Class, https://docs.derivative.ca/Base_COMP)."""

    OPType = "baseCOMP"
    family = "COMP"
    builtin_pars = {"ext0object": ("Python", ""), "ext0name": ("Str", ""), "ext0promote": ("Toggle", False),
                    "reinitextensions": ("Pulse", False)}

    def __init__(self, td: FakeTD, parent: COMP | None, name: str) -> None:
        super().__init__(td, parent, name)
        self._children: dict[str, OP] = {}
        self._pages: list[Page] = []
        self._extensions: list[tuple[str, object]] = []

    @property
    def children(self) -> list[OP]:
        return list(self._children.values())

    @property
    def customPages(self) -> list[Page]:  # noqa: N802
        return list(self._pages)

    @property
    def customPars(self) -> list[Par]:  # noqa: N802
        return [p for page in self._pages for p in page.pars]

    @property
    def inputConnectors(self) -> list[Connector]:  # noqa: N802
        # "In/Out TOPs inside a COMP create the COMP's input/output connectors" (In_TOP).
        return [child._comp_connector for child in self._children.values() if isinstance(child, inTOP)]

    @inputConnectors.setter
    def inputConnectors(self, _value) -> None:  # noqa: N802 - OP.__init__ sets the plain list
        pass

    @property
    def extensions(self) -> list:
        return [instance for _, instance in self._extensions]

    def create(self, opType, name=None, initialize=True):  # noqa: N803
        self._td.check_thread("COMP.create")
        cls = _OP_TYPES.get(opType) if isinstance(opType, str) else opType
        if cls not in _OP_TYPES.values():
            raise tdError(f"Unknown operator type. Value:{opType!r} Type:{type(opType)}")
        base = name or re.sub(r"(COMP|TOP|DAT|CHOP)$", "", cls.OPType) + "1"
        final = base
        if final in self._children:  # "the next numbered name if its already in use" [rule unverified]
            stem = re.sub(r"\d+$", "", base)
            n = 1
            while f"{stem}{n}" in self._children:
                n += 1
            final = f"{stem}{n}"
        node = cls(self._td, self, final)
        self._children[final] = node
        return node

    def appendCustomPage(self, name: str) -> Page:  # noqa: N802
        self._td.check_thread("COMP.appendCustomPage")
        page = Page(self, name)
        self._pages.append(page)
        return page

    def sortCustomPages(self, *pages) -> None:  # noqa: N802
        order = {name: i for i, name in enumerate(pages)}
        self._pages.sort(key=lambda p: order.get(p.name, len(order)))

    def initializeExtensions(self, index=None):  # noqa: N802
        """Compiles the Extension Object expressions; calls the old instances' cleanup hook first."""
        self._td.check_thread("COMP.initializeExtensions")
        for _, old in self._extensions:
            hook = getattr(old, "onDestroyTD", None) if self._td.build == "2025" else None
            hook = hook or getattr(old, "__delTD__", None)
            if hook is not None:
                hook()
        self._extensions = []
        source = self.par.ext0object.eval()
        if not source:
            return None

        instance = eval(source, {"me": self, "op": _expression_op(self), "parent": self.parent})
        self._extensions.append((self.par.ext0name.eval() or type(instance).__name__, instance))
        if self._td.build == "2025" and hasattr(instance, "onInitTD"):
            instance.onInitTD()
        return instance

    def fake_on_pulse(self, par: Par) -> None:
        if par.name == "reinitextensions":
            self.initializeExtensions()

    def __getattr__(self, name: str):
        # Promoted extensions: "all its capitalized methods and members are available at the Component level".
        if name[:1].isupper() and not name.startswith("_"):
            for _, instance in self.__dict__.get("_extensions", []):
                if self.par.ext0promote.eval() and hasattr(instance, name):
                    return getattr(instance, name)
        raise AttributeError(f"'td.baseCOMP' object has no attribute '{name}'")


class baseCOMP(COMP):  # noqa: N801 - TouchDesigner's type name
    pass


class TOP(OP):
    """td.TOP (https://docs.derivative.ca/TOP_Class)."""

    family = "TOP"
    width = 0
    height = 0

    def saveByteArray(self, filetype=".tiff", quality=1.0, metadata=()):  # noqa: N802
        """The encoded image as a bytearray; "Suffix must include the period"."""
        self._td.check_thread("TOP.saveByteArray")
        suffix = "." + str(filetype).rsplit(".", 1)[-1].lower() if "." in str(filetype) else None
        if suffix not in (".tif", ".tiff", ".jpg", ".jpeg", ".bmp", ".png", ".exr", ".dds"):
            raise tdError(f"Unsupported file type {filetype!r} (the suffix must include the period)")
        started = time.perf_counter()
        self._td.fake_captures.append((self.path, suffix, quality))
        source = self.fake_image_source()
        if source is None:
            return bytearray()
        if suffix not in (".jpg", ".jpeg", ".png"):
            raise tdError(f"the fake encodes .jpg and .png only, not {suffix}")
        key = (source, suffix)
        if key not in _ENCODED:  # the same picture encodes to the same bytes: encode it once
            width, height, level = source
            _ENCODED[key] = (jpeg_gray(width, height, lambda bx, by: (level + bx * 3 + by * 5) % 256)
                             if suffix != ".png" else png_gray(width, height, level))
        data = bytearray(_ENCODED[key])
        self._td.fake_capture_seconds.append(time.perf_counter() - started)
        return data

    def fake_image_source(self):
        """(width, height, grey level) of what this TOP shows, or None for nothing."""
        return None


class nullTOP(TOP):  # noqa: N801
    """A Null TOP. In the tests it stands for whatever feeds the component: ``fake_pixels`` is its image."""

    OPType = "nullTOP"
    fake_inputs = 1
    fake_pixels: tuple[int, int, int] | None = None

    def fake_image_source(self):
        if self.fake_pixels is not None:
            return self.fake_pixels
        return self.inputs[0].fake_image_source() if self.inputs else None


class inTOP(TOP):  # noqa: N801
    """In TOP (https://docs.derivative.ca/In_TOP): the COMP's input connector; shows what is wired to it."""

    OPType = "inTOP"
    builtin_pars = {"label": ("Str", "")}

    def __init__(self, td, parent, name) -> None:
        super().__init__(td, parent, name)
        self._comp_connector = Connector(parent, 0, True)

    def fake_image_source(self):
        source = self._comp_connector._source
        return source.fake_image_source() if source is not None else None


class outTOP(TOP):  # noqa: N801
    OPType = "outTOP"
    fake_inputs = 1
    builtin_pars = {"label": ("Str", "")}

    def fake_image_source(self):
        return self.inputs[0].fake_image_source() if self.inputs else None


class crossTOP(TOP):  # noqa: N801
    """Cross TOP (https://docs.derivative.ca/Cross_TOP): ``cross`` 0 shows input 1, 1 shows input 2."""

    OPType = "crossTOP"
    fake_inputs = 2
    builtin_pars = {"cross": ("Float", 0.0)}


class moviefileinTOP(TOP):  # noqa: N801
    """Movie File In TOP (https://docs.derivative.ca/Movie_File_In_TOP, …/MoviefileinTOP_Class).

    The fake opens ``file`` and pre-reads it over frames: ``fake_open_frames`` frames after the file
    changed or ``preload()`` it is open (``isOpen``), ``prereadframes`` frames later
    ``isFullyPreRead``. A file that is not a whole MP4 (checked box by box) or image is
    ``isInvalid``. ``fake_cues`` counts ``cuepulse`` pulses.
    """

    OPType = "moviefileinTOP"
    builtin_pars = {"file": ("File", ""), "play": ("Toggle", True), "playmode": ("Menu", "locked"),
                    "textendright": ("Menu", "hold"), "prereadframes": ("Int", 2), "cuepulse": ("Pulse", False),
                    "reloadpulse": ("Pulse", False)}
    fake_open_frames = 1

    def __init__(self, td, parent, name) -> None:
        super().__init__(td, parent, name)
        self._loaded_file = ""
        self._frames_loading = 0
        self.isOpen = False  # noqa: N815
        self.isFullyPreRead = False  # noqa: N815
        self.isInvalid = False  # noqa: N815
        self.fake_cues = 0
        self.fake_unloads = 0

    def preload(self, index=None) -> None:
        self._td.check_thread("moviefileinTOP.preload")
        self._restart_loading()

    def unload(self, cacheMemory=False) -> None:  # noqa: N803
        self._td.check_thread("moviefileinTOP.unload")
        self.fake_unloads += 1
        self.isOpen = self.isFullyPreRead = False
        self._loaded_file = ""

    def _restart_loading(self) -> None:
        self._loaded_file = self.par.file.eval()
        self._frames_loading = 0
        self.isOpen = self.isFullyPreRead = self.isInvalid = False

    def fake_on_pulse(self, par: Par) -> None:
        if par.name == "cuepulse":
            self.fake_cues += 1
        elif par.name == "reloadpulse":
            self._restart_loading()

    def fake_frame(self) -> None:
        """One frame of loading (the fake's stand-in for TD's reader threads)."""
        file = self.par.file.eval()
        if file != self._loaded_file:
            self._restart_loading()
        if not file or self.isFullyPreRead or self.isInvalid:
            return
        self._frames_loading += 1
        if self._frames_loading == self.fake_open_frames:
            if not _readable_media(file):
                self.isInvalid = True
                return
            self.isOpen = True
        if self._frames_loading >= self.fake_open_frames + int(self.par.prereadframes.eval()):
            self.isFullyPreRead = True


def _readable_media(path: str) -> bool:
    try:
        data = Path(path).read_bytes()
    except OSError:
        return False
    if data[:3] == b"\xff\xd8\xff":
        return data[-2:] == b"\xff\xd9"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return data[-8:-4] == b"IEND"
    try:
        return mp4_info(data).sample_count > 0
    except (ValueError, struct.error, IndexError):
        return False


class DAT(OP):
    """td.DAT (https://docs.derivative.ca/DAT_Class)."""

    family = "DAT"

    def __init__(self, td, parent, name) -> None:
        super().__init__(td, parent, name)
        self._text = ""
        self._module = None

    @property
    def text(self) -> str:
        return self._text

    @text.setter
    def text(self, value: str) -> None:
        self._td.check_thread("DAT.text")
        self._text = str(value)
        self._module = None  # recompiled at the next use

    @property
    def module(self):
        """The DAT's text compiled as a module that sys.modules never hears of (touchdesigner-api.md §3.3)."""
        self._td.check_thread("DAT.module")
        if self._module is None:
            module = types.ModuleType(self._name)
            module.__dict__.update({"me": self, "op": self.op, "parent": self.parent, "tdError": tdError,
                                    "absTime": self._td.absTime})
            try:
                code = compile(self._text, self.path, "exec", dont_inherit=True)
                exec(code, module.__dict__)
            except SyntaxError as exc:
                raise tdError(f"Module compilation error. See {self.path} for details.") from exc
            self._module = module
        return self._module


class textDAT(DAT):  # noqa: N801
    OPType = "textDAT"


class Cell:
    """td.Cell (https://docs.derivative.ca/Cell_Class): ``val`` is always a string."""

    def __init__(self, table: tableDAT, row: int, col: int) -> None:
        self.owner, self.row, self.col = table, row, col

    @property
    def val(self) -> str:
        return self.owner._rows[self.row][self.col]


class tableDAT(DAT):  # noqa: N801
    """Table DAT (https://docs.derivative.ca/TableDAT_Class)."""

    OPType = "tableDAT"

    def __init__(self, td, parent, name) -> None:
        super().__init__(td, parent, name)
        self._rows: list[list[str]] = []

    def clear(self, keepSize=False, keepFirstRow=False, keepFirstCol=False) -> None:  # noqa: N803
        self._td.check_thread("tableDAT.clear")
        self._rows = self._rows[:1] if keepFirstRow else []

    def appendRow(self, vals=(), nameOrIndex=None, sort=None) -> int:  # noqa: N802, N803
        self._td.check_thread("tableDAT.appendRow")
        self._rows.append([str(v) for v in vals])
        return len(self._rows) - 1

    @property
    def numRows(self) -> int:  # noqa: N802
        return len(self._rows)

    def __getitem__(self, key) -> Cell | None:
        row, col = key
        if isinstance(row, str):
            row = next((i for i, r in enumerate(self._rows) if r and r[0] == row), None)
        if row is None or row >= len(self._rows) or col >= len(self._rows[row]):
            return None
        return Cell(self, row, col)

    @property
    def text(self) -> str:
        return "".join("\t".join(row) + "\n" for row in self._rows)


class executeDAT(DAT):  # noqa: N801
    """Execute DAT (https://docs.derivative.ca/Execute_DAT): callbacks run only with their toggle on."""

    OPType = "executeDAT"
    builtin_pars = {"active": ("Toggle", True), "start": ("Toggle", False), "create": ("Toggle", False),
                    "exit": ("Toggle", False), "framestart": ("Toggle", False), "frameend": ("Toggle", False)}


class parameterexecuteDAT(DAT):  # noqa: N801
    """Parameter Execute DAT (https://docs.derivative.ca/Parameter_Execute_DAT)."""

    OPType = "parameterexecuteDAT"
    builtin_pars = {"active": ("Toggle", True), "op": ("OP", ""), "pars": ("Str", "*"),
                    "valuechange": ("Toggle", True), "onpulse": ("Toggle", True), "custom": ("Toggle", False),
                    "builtin": ("Toggle", False)}

    def fake_watches(self, par: Par) -> bool:
        if not self.par.active.eval():
            return False
        target = self.op(self.par.op.eval()) if self.par.op.eval() else None
        if target is None or target is not par.owner:
            return False
        if not (self.par.custom.eval() if par.isCustom else self.par.builtin.eval()):
            return False
        patterns = str(self.par.pars.eval()).split()
        return any(re.fullmatch(re.escape(p).replace(r"\*", ".*"), par.name) for p in patterns)


class Channel:
    """td.Channel (https://docs.derivative.ca/Channel_Class): samples settable in a Script CHOP."""

    def __init__(self, owner: scriptCHOP, name: str) -> None:
        self.owner, self.name = owner, name
        self.vals = [0.0] * owner.numSamples

    def __getitem__(self, i: int) -> float:
        return self.vals[i]

    def __setitem__(self, i: int, value: float) -> None:
        self.vals[i] = float(value)

    def eval(self) -> float:
        return self.vals[0] if self.vals else 0.0


class scriptCHOP(OP):  # noqa: N801
    """Script CHOP (https://docs.derivative.ca/Script_CHOP, …/ScriptCHOP_Class): its callbacks DAT's
    ``onCook(scriptOp)`` builds the channels; pull-based, so ``cook(force=True)`` is how it updates."""

    OPType = "scriptCHOP"
    family = "CHOP"
    builtin_pars = {"callbacks": ("DAT", "")}

    def __init__(self, td, parent, name) -> None:
        super().__init__(td, parent, name)
        self._chans: list[Channel] = []
        self.numSamples = 1  # noqa: N815

    def clear(self) -> None:
        self._chans = []

    def appendChan(self, name=None) -> Channel:  # noqa: N802
        channel = Channel(self, name or f"chan{len(self._chans) + 1}")
        self._chans.append(channel)
        return channel

    @property
    def numChans(self) -> int:  # noqa: N802
        return len(self._chans)

    def chan(self, name) -> Channel | None:
        return next((c for c in self._chans if c.name == name), None)

    def __getitem__(self, name) -> Channel | None:
        return self.chan(name)

    def cook(self, force=False, recurse=False, includeUtility=False) -> None:  # noqa: N803
        super().cook(force, recurse, includeUtility)
        dat = self.op(self.par.callbacks.eval())
        if dat is not None and hasattr(dat.module, "onCook"):
            dat.module.onCook(self)


class outDAT(DAT):  # noqa: N801
    """Out DAT (https://docs.derivative.ca/Out_DAT): the COMP's DAT output connector; passes its input on."""

    OPType = "outDAT"
    fake_inputs = 1
    builtin_pars = {"label": ("Str", "")}


class outCHOP(OP):  # noqa: N801
    """Out CHOP (https://docs.derivative.ca/Out_CHOP): the COMP's CHOP output connector."""

    OPType = "outCHOP"
    family = "CHOP"
    fake_inputs = 1
    builtin_pars = {"label": ("Str", "")}


_OP_TYPES = {cls.OPType: cls for cls in (baseCOMP, nullTOP, inTOP, outTOP, crossTOP, moviefileinTOP, textDAT,
                                         tableDAT, outDAT, executeDAT, parameterexecuteDAT, scriptCHOP, outCHOP)}


# ---------------------------------------------------------------------------------------------
# The application: root, frame loop, main-thread guard
# ---------------------------------------------------------------------------------------------


class AbsTime:
    """td.absTime (https://docs.derivative.ca/AbsTime_Class)."""

    def __init__(self) -> None:
        self.frame = 0.0
        self.seconds = 0.0


class FakeTD:
    """One TouchDesigner process: ``root`` (/), ``project1`` below it, and the frame loop.

    ``build`` is "2025" (extensions get ``onInitTD``/``onDestroyTD``) or "2023" (``__delTD__`` only),
    touchdesigner-api.md §3.2.
    """

    def __init__(self, build: str = "2025", fps: float = 60.0) -> None:
        self.build = build
        self.fps = fps
        self.main_thread = threading.get_ident()
        self.thread_violations: list[str] = []
        self.absTime = AbsTime()  # noqa: N815
        self.root = baseCOMP(self, None, "")
        self.project1 = self.root.create("baseCOMP", "project1")
        self._changes: list[tuple[Par, object]] = []
        self.fake_captures: list[tuple[str, str, float]] = []
        self.fake_capture_seconds: list[float] = []  # time spent in saveByteArray (TD's cost, not ours)
        #: (callback name, wall seconds, CPU seconds of the main thread) of every call into a DAT callback.
        self.call_times: list[tuple[str, float, float]] = []

    def check_thread(self, what: str) -> None:
        if threading.get_ident() != self.main_thread:
            message = f"{what} used from thread {threading.current_thread().name}"
            self.thread_violations.append(message)
            raise tdError(message)

    def op(self, path: str):
        return self.fake_resolve(self.root, str(path))

    def fake_resolve(self, base: OP | None, path: str):
        node = self.root if path.startswith("/") else base
        for part in [p for p in path.split("/") if p]:
            if node is None:
                return None
            if part == ".":
                continue
            if part == "..":
                node = node._parent
                continue
            # A name seen from a COMP is its child; seen from any other operator, a sibling.
            network = node if isinstance(node, COMP) else node._parent
            node = network._children.get(part) if network is not None else None
        return node

    def fake_par_changed(self, par: Par, previous) -> None:
        if par.isCustom:
            self._changes.append((par, previous))

    def _dats(self, cls) -> list:
        found = []

        def walk(comp: COMP) -> None:
            for child in comp.children:
                if isinstance(child, cls):
                    found.append(child)
                if isinstance(child, COMP):
                    walk(child)

        walk(self.root)
        return sorted(found, key=lambda d: d.path)  # "numbered-alphanumeric order of the DAT's names"

    def _timed(self, name: str, function, *args) -> None:
        start, cpu = time.perf_counter(), time.thread_time()
        try:
            function(*args)
        finally:
            self.call_times.append((name, time.perf_counter() - start, time.thread_time() - cpu))

    def fake_dispatch_pulse(self, par: Par) -> None:
        for dat in self._dats(parameterexecuteDAT):
            if dat.par.onpulse.eval() and dat.fake_watches(par) and hasattr(dat.module, "onPulse"):
                self._timed("onPulse", dat.module.onPulse, par)

    def _dispatch_value_changes(self) -> None:
        changes, self._changes = self._changes, []
        for par, previous in changes:
            if not par.valid:
                continue
            for dat in self._dats(parameterexecuteDAT):
                function = getattr(dat.module, "onValueChange", None)
                if function is None or not dat.par.valuechange.eval() or not dat.fake_watches(par):
                    continue
                # Both template forms ship: (par, prev) and (par, val, prev) (touchdesigner-api.md §4.2).
                args = (par, previous) if len(inspect.signature(function).parameters) == 2 else (par, par.eval(), previous)
                self._timed("onValueChange", function, *args)

    def frame(self) -> None:
        """One frame: Frame Start callbacks, value-change callbacks, movie loading, Frame End callbacks."""
        self.absTime.frame += 1
        self.absTime.seconds = self.absTime.frame / self.fps
        frame = self.absTime.frame
        for dat in self._dats(executeDAT):
            if dat.par.active.eval() and dat.par.framestart.eval() and hasattr(dat.module, "onFrameStart"):
                self._timed("onFrameStart", dat.module.onFrameStart, frame)
        self._dispatch_value_changes()
        for movie in self._dats(moviefileinTOP):
            movie.fake_frame()
        for dat in self._dats(executeDAT):
            if dat.par.active.eval() and dat.par.frameend.eval() and hasattr(dat.module, "onFrameEnd"):
                self._timed("onFrameEnd", dat.module.onFrameEnd, frame)

    def exit(self) -> None:
        """Quitting TouchDesigner: onExit of every Execute DAT with Exit on."""
        for dat in self._dats(executeDAT):
            if dat.par.active.eval() and dat.par.exit.eval() and hasattr(dat.module, "onExit"):
                self._timed("onExit", dat.module.onExit)

    def run_frames(self, until, timeout: float = 60.0, *, real_time: bool = True, on_frame=None):
        """Runs frames (about 100 a second of wall time) until ``until()`` is truthy; returns its value."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.frame()
            if on_frame is not None:
                on_frame()
            value = until()
            if value:
                return value
            if real_time:
                time.sleep(0.01)
        raise AssertionError(f"not reached within {timeout}s (frame {self.absTime.frame})")
