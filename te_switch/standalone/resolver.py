"""Encoder names (library labels) or file paths -> the file a slot loads (the standalone tools' resolver)."""

from __future__ import annotations

import os

from te_switch.core.detect import TowerInfo, inspect_path
from te_switch.core.errors import IncompatibleError, TESwitchError
from te_switch.core.library import EncoderLibrary, file_identity, sha256_of
from te_switch.core.selection import KINDS_BY_SLOT, SLOT_LABELS
from te_switch.hosts.engine import EncoderSource


class EncoderResolver:
    """Encoder labels (library names) or file paths → :class:`EncoderSource` for a slot."""

    def __init__(self, library: EncoderLibrary | None = None) -> None:
        self.library = library
        self._hashes: dict[tuple[str, int, float], str] = {}

    def __call__(self, slot: str, name: str) -> EncoderSource:
        if self.library is not None:
            choice = self.library.find(name)
            if choice is not None and choice.tower.kind in KINDS_BY_SLOT[slot]:
                return self._source(choice.file.path, choice.tower, choice.label)
        if os.path.exists(name):
            return self._source(name, self.tower_for(slot, name), os.path.basename(name))
        where = f" in {', '.join(self.library.folders)}" if self.library and self.library.folders else ""
        raise TESwitchError(f"{name}: no such encoder file{where}")

    def _source(self, path: str, tower: TowerInfo, label: str) -> EncoderSource:
        size, mtime = file_identity(path)
        return EncoderSource(path, tower, label, self.short_hash(path), size, mtime)

    def tower_for(self, slot: str, path: str) -> TowerInfo:
        """The tower of ``path`` that fits ``slot`` (a whole checkpoint holds several)."""
        towers = inspect_path(path)
        errors = [t.error for t in towers if t.error]
        if errors:
            raise TESwitchError(errors[0])
        fitting = [t for t in towers if t.usable and t.kind in KINDS_BY_SLOT[slot]]
        named = [t for t in fitting if t.tower in (None, slot)]
        if named or fitting:
            return (named or fitting)[0]
        kinds = ", ".join(sorted({str(t.kind) for t in towers}))
        raise IncompatibleError(f"{os.path.basename(path)}: a {kinds} file cannot go into the {SLOT_LABELS[slot]} slot")

    def slot_of(self, name: str) -> str:
        """Which slot an encoder file belongs in, from its detected kind."""
        towers: list[TowerInfo] = []
        if self.library is not None and (choice := self.library.find(name)) is not None:
            towers = [choice.tower]
        elif os.path.exists(name):
            towers = inspect_path(name)
        else:
            where = f" in {', '.join(self.library.folders)}" if self.library and self.library.folders else ""
            raise TESwitchError(f"{name}: no such encoder file{where}")
        for t in towers:
            if t.error:
                raise TESwitchError(t.error)
            for slot, kinds in KINDS_BY_SLOT.items():
                if t.usable and t.kind in kinds:
                    return slot
        what = towers[0].note or towers[0].kind if towers else "nothing"
        raise TESwitchError(f"{os.path.basename(name)}: not a usable text encoder ({what})")

    def short_hash(self, path: str) -> str:
        if self.library is not None and self.library.contains(path):
            return self.library.short_hash(path)
        st = os.stat(path)
        key = (os.path.realpath(path), st.st_size, st.st_mtime)
        if key not in self._hashes:
            self._hashes[key] = sha256_of(path)[:10]
        return self._hashes[key]
