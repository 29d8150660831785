"""The extension points of act, each one registry: a thing is declared once, where it is defined, with the config
model its entries take, and the config schema is built from the registry (the two cannot drift).

    @STAGE_KINDS.register("prune", config=PruneStageConfig)     # act.orchestrate.stage_kinds
    class PruneStage(StageKind): ...

    LOSSES.add("oks", oks_keypoint_loss, config=OKSLossSpec)     # act.blocks.losses
    CALIBRATORS.add("mse", mse_clip)                             # act.blocks.quant.calibrators

The registries live here, in the core, because the config (also the core) validates names against them; act's own
entries are declared in a higher layer and load on first use (`builtins`: a module path, imported by name the way
act.core.family loads its built-in families), so the core imports nothing above it. User code adds entries the same
way, before its config is validated.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Dict, Iterator, Optional, Tuple, Type


class Registry:
    """name -> (entry, config model). `what` names the kind of thing in messages, `key` the config key that takes
    its names."""

    def __init__(self, what: str, key: str, builtins: Optional[str] = None):
        self.what, self.key, self.builtins = what, key, builtins
        self._entries: Dict[str, Tuple[Any, Optional[Type]]] = {}
        self._loaded = builtins is None

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True  # (first: the module's own registrations come back here)
            importlib.import_module(self.builtins)

    def add(self, name: str, entry: Any, config: Optional[Type] = None, replace: bool = False) -> Any:
        if name in self._entries and not replace and self._entries[name][0] is not entry:
            raise ValueError(f"a {self.what} named {name!r} is registered already")
        self._entries[name] = (entry, config)
        return entry

    def register(self, name: str, config: Optional[Type] = None) -> Callable[[Any], Any]:
        """Decorator form of `add`."""
        return lambda entry: self.add(name, entry, config)

    def names(self) -> Tuple[str, ...]:
        self._load()
        return tuple(self._entries)

    def __contains__(self, name: object) -> bool:
        self._load()
        return isinstance(name, str) and name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def expected(self) -> str:
        return "expected one of " + ", ".join(repr(n) for n in self.names())

    def check(self, name: Any) -> str:
        """`name` if registered, else ValueError saying which names are (a config validator's message)."""
        if name not in self:
            raise ValueError(f"unknown {self.what} {name!r}; {self.expected()}")
        return name

    def __getitem__(self, name: str) -> Any:
        self.check(name)
        return self._entries[name][0]

    def config(self, name: str, default: Optional[Type] = None) -> Optional[Type]:
        """The config model entries of this name take (default where the entry declared none)."""
        self.check(name)
        return self._entries[name][1] or default


LOSSES = Registry("distillation loss", "distill.losses.<branch>.type", builtins="act.blocks.losses")
CALIBRATORS = Registry("calibrator", "ptq.calibrator", builtins="act.blocks.quant.calibrators")
STAGE_KINDS = Registry("stage type", "stages[].type", builtins="act.orchestrate.stage_kinds")
