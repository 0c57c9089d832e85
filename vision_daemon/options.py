"""Per-stream options, declared once: type, bounds, default, who may set them, and their doc.

Every entry point parses through this module: a hello's options (msgpack), a browser's query
string (text), an operator's PATCH /streams/{name} (JSON) and a camera's table or POST /cameras
body (TOML / JSON). One `resolve` merges the daemon's defaults <- what the client or camera said
<- an operator's overrides. The /stats and /cameras output models and the table in
docs/PROTOCOL.md come from the same declarations (`SPECS`), so a new option is one field here
plus the code that acts on it.

Pure: no sockets, no clocks, no imports of the daemon's other modules.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

TRUE_WORDS = ("true", "on", "1")
FALSE_WORDS = ("false", "off", "0")
UNSET_WORDS = ("auto", "")  # a tri-state option left to the daemon


class OptionError(ValueError):
    """A value an entry point refuses; the message is one line naming the option and its bound."""


@dataclass(frozen=True, slots=True)
class Spec:
    """How one option is checked, defaulted, resolved and documented."""

    name: str
    kind: type  # int, float, str or bool (bool options are tri-state: None = the daemon's)
    default: Any  # what a hello or a query that does not say it means
    doc: str
    low: float = 0.0  # numbers: the accepted range, inclusive
    high: float = 0.0
    unset: Any = None  # a number that means "the daemon's setting" (motion_gate's -1)
    choices: tuple[str, ...] = ()  # strings: the accepted values ("" = the daemon's)
    daemon: str = ""  # the Config field an unset value resolves to ("" = none)
    operator: bool = True  # an operator may override it with PATCH /streams/{name}
    camera_default: Any = None  # a camera's default when it differs from a hello's
    what: str = ""  # what a valid value is, where the generated words would not say it well

    @property
    def must(self) -> str:
        """What a valid value is, for error messages and the PROTOCOL table."""
        if self.what:
            return self.what
        if self.kind is bool:
            return "true or false (or null / auto: the daemon's setting)"
        if self.kind is str:
            return " or ".join(self.choices)
        what = "an integer" if self.kind is int else "a number"
        unset = f" (or {self.unset}: the daemon's setting)" if self.unset is not None else ""
        return f"{what} in {_num(self.low)}..{_num(self.high)}{unset}"

    def check(self, value: Any) -> Any:
        """A typed value (msgpack, JSON, TOML) in range, or OptionError; None means unset."""
        if value is None:
            return self.default
        if self.kind is bool:
            return _tri_state(self, value)
        if self.kind is str:
            if isinstance(value, str) and value in self.choices:
                return value
            raise OptionError(f"{self.name} must be {self.must}")
        ok = not isinstance(value, bool) and isinstance(value, int | float)
        if self.kind is int:
            ok = ok and isinstance(value, int)
        if ok and (
            value == self.unset or (math.isfinite(value) and self.low <= value <= self.high)
        ):
            return self.kind(value)
        raise OptionError(f"{self.name} must be {self.must}")

    def check_text(self, text: str) -> Any:
        """A value given as text (a query parameter), converted to the option's type, then checked
        exactly as a typed value."""
        if self.kind is bool or self.kind is str:
            return self.check(text.lower() if self.kind is bool else text)
        try:
            number: int | float = int(text) if self.kind is int else float(text)
        except ValueError:
            raise OptionError(f"{self.name} must be {self.must}") from None
        return self.check(number)


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _tri_state(spec: Spec, value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        word = value.lower()
        if word in TRUE_WORDS:
            return True
        if word in FALSE_WORDS:
            return False
        if word in UNSET_WORDS:
            return None
    raise OptionError(f"{spec.name} must be {spec.must}")


def _opt(default: Any, doc: str, **spec: Any) -> Any:
    return field(default=default, metadata={"spec": (doc, spec)})


@dataclass(frozen=True, slots=True)
class StreamOptions:
    """A stream's options, as a client, a camera, the daemon and an operator set them."""

    skip_frames: int = _opt(1, "analyse every Nth received frame (1 = all)", low=1, high=100_000)
    max_fps: float = _opt(
        0.0,
        "analyse at most this many frames a second (0 = no limit)",
        high=1000,
        camera_default=5.0,
    )
    serve: str = _opt(
        "",
        "which queued frame a turn serves: latest (older ones drop as superseded) or fifo",
        choices=("latest", "fifo"),
        daemon="serve_default",
        operator=False,
    )
    source_fps: float = _opt(
        0.0,
        "the rate the client sends at without advice (0 = not said): its demand in the "
        "server-advised rates",
        high=1000,
        operator=False,
    )
    motion_gate: float = _opt(
        -1.0,
        "a frame whose thumbnail changed in less than this share of its pixels reuses the last "
        "analysed frame's detections (0 = off)",
        high=1,
        unset=-1.0,
        daemon="motion_gate",
        what="a share in 0..1 (0 = off; -1: the daemon's setting)",
    )
    track: bool | None = _opt(
        None, "track objects (a stream with lines or zones is always tracked)", daemon="track"
    )
    min_confidence: float = _opt(
        0.0,
        "detections scoring below this are left out for this stream (0 = the daemon's conf "
        "only; a value under conf changes nothing)",
        high=1,
    )

    def to_dict(self) -> dict[str, object]:
        return {name: getattr(self, name) for name in SPECS}


def _specs() -> dict[str, Spec]:
    kinds = {"int": int, "float": float, "str": str, "bool | None": bool}
    out = {}
    for f in dataclasses.fields(StreamOptions):
        doc, extra = f.metadata["spec"]
        out[f.name] = Spec(f.name, kinds[str(f.type)], f.default, doc, **extra)
    return out


SPECS: dict[str, Spec] = _specs()
OPERATOR_OPTIONS = tuple(name for name, s in SPECS.items() if s.operator)
CAMERA_DEFAULTS = StreamOptions(
    **{n: s.camera_default for n, s in SPECS.items() if s.camera_default is not None}
)


def parse(raw: Mapping[str, Any], base: StreamOptions | None = None) -> StreamOptions:
    """Typed values (a hello's map, a camera's table, a JSON body) over `base`; keys that are not
    options are the caller's business and ignored here. Raises OptionError."""
    values = {k: SPECS[k].check(v) for k, v in raw.items() if k in SPECS and v is not None}
    return dataclasses.replace(base or StreamOptions(), **values)


def parse_text(query: Mapping[str, str]) -> StreamOptions:
    """Options given as text (a browser's query string), checked as typed values are."""
    return StreamOptions(**{k: SPECS[k].check_text(v) for k, v in query.items() if k in SPECS})


def parse_overrides(raw: Any) -> dict[str, object]:
    """An operator's PATCH body: a non-empty map of operator options. Raises OptionError."""
    if not isinstance(raw, dict) or not raw or set(raw) - set(OPERATOR_OPTIONS):
        names = ", ".join(OPERATOR_OPTIONS)
        raise OptionError(f"send a JSON object with one or more of {names}")
    return {k: SPECS[k].check(v) for k, v in raw.items()}


def defaults_of(config: Any) -> dict[str, object]:
    """The daemon's settings that unset options resolve to, read once from its Config."""
    return {n: getattr(config, s.daemon) for n, s in SPECS.items() if s.daemon}


def resolve(
    given: StreamOptions, daemon: Mapping[str, Any], overrides: Mapping[str, Any]
) -> StreamOptions:
    """default <- what the client or camera said <- an operator's overrides; what is still unset
    takes the daemon's setting, except `track`, which stays None so /stats shows that the
    stream follows the daemon (the pipeline reads the daemon's track when it is None)."""
    options = dataclasses.replace(given, **overrides) if overrides else given
    unset = {
        name: value
        for name, value in daemon.items()
        if name != "track" and _is_unset(SPECS[name], getattr(options, name))
    }
    return dataclasses.replace(options, **unset) if unset else options


def _is_unset(spec: Spec, value: Any) -> bool:
    return value is None or value == "" or (spec.unset is not None and value == spec.unset)


def protocol_table(names: Iterable[str] = SPECS) -> str:
    """The options table of docs/PROTOCOL.md (a test keeps the doc equal to this)."""
    rows = ["| option | type | accepted | default | PATCH | meaning |", "|---|---|---|---|---|---|"]
    for name in names:
        s = SPECS[name]
        default = "daemon's " + s.daemon if s.daemon else repr(s.default)
        if s.camera_default is not None:
            default += f" (cameras: {s.camera_default!r})"
        kind = "bool" if s.kind is bool else s.kind.__name__
        patch = "yes" if s.operator else "no"
        rows.append(f"| `{name}` | {kind} | {s.must} | {default} | {patch} | {s.doc} |")
    return "\n".join(rows)
