"""Config dataclasses that are frozen in place once a run has validated them.

A config describes a run; it is not the run's state. The Trainer validates its own copy of the config, resolves
what it derives from the world it runs in (the warm-up fitted to max_steps), then calls ``freeze()``: from there on
assigning any field raises, so a part of the run cannot change the config under another part that read it (the bug
fixed in 60fce88: the growth controller's ``t`` and the Trainer's ``t`` had diverged). What changes during a run is
its ``RunState`` and its batch layout (``run_state.BatchLayout``).

Only attribute assignment is refused: the tables a config holds (a stage's ``shape``, ``options``, ``lag``) are
plain dicts that nothing in a run writes. A copy (``copy.deepcopy``) of a frozen config is frozen; a changed copy
(``dataclasses.replace``) and an ``editable_copy()`` are new configs, not frozen.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import TypeVar

C = TypeVar("C", bound="Freezable")


class Freezable:
    """Mixin for a (non-frozen) dataclass: ``freeze()`` makes it and the configs it holds refuse assignment."""

    def __setattr__(self, name: str, value: object) -> None:
        if self.__dict__.get("_frozen", False):
            raise dataclasses.FrozenInstanceError(
                f"cannot assign {type(self).__name__}.{name}: the config is frozen once the run has validated it "
                f"(what changes during a run is its RunState and batch layout)")
        object.__setattr__(self, name, value)

    def _configs(self) -> list[Freezable]:
        """The configs among this one's fields (lists of configs included: ``RunConfig.stage``)."""
        values = [getattr(self, f.name) for f in dataclasses.fields(self)]
        return [x for v in values for x in (v if isinstance(v, list) else [v]) if isinstance(x, Freezable)]

    def freeze(self) -> None:
        """Freeze this config and every config it holds."""
        for c in self._configs():
            c.freeze()
        object.__setattr__(self, "_frozen", True)

    def editable_copy(self: C) -> C:
        """A deep copy that is not frozen, nor is any config it holds (a new run's config, from a running one's)."""
        new = copy.deepcopy(self)
        new._thaw()
        return new

    def _thaw(self) -> None:  # only ever on a fresh copy: a frozen config that others hold stays frozen
        for c in self._configs():
            c._thaw()
        self.__dict__.pop("_frozen", None)

    @property
    def frozen(self) -> bool:
        return self.__dict__.get("_frozen", False)
