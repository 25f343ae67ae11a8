"""core.library: folder scan, the (path, size, mtime) header cache, short hashes, labels, path safety.

Small "unknown"-kind files exercise scanning and caching; encoders that must be *usable* (choices,
labels, find) are real-shape sparse files: detection depends on width/depth, and a sparse file costs
no disk or time until it is hashed (only the find_by_hash test hashes real-shape files: fp8, tiny vocab).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import filemakers as fm
import pytest

from te_switch.core import detect as detect_mod
from te_switch.core import library as library_mod
from te_switch.core.errors import TESwitchError
from te_switch.core.library import EncoderLibrary, sha256_of


def tiny(path: Path, width: int = 16, metadata: dict[str, str] | None = None) -> Path:
    """A valid CLIP-shaped file too narrow to be a known kind (detected, but not usable)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return fm.write_sparse_safetensors(path, fm.hf_clip_spec(width, 2, vocab=10), metadata)


def clip_l(path: Path, metadata: dict[str, str] | None = None) -> Path:
    """Real CLIP-L shapes (kind clip-l), fp8 and a tiny vocabulary: 85 MB logical, nothing on disk."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return fm.write_sparse_safetensors(path, fm.hf_clip_spec(768, 12, vocab=8, dtype="F8_E4M3"), metadata)


def clip_g(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return fm.write_sparse_safetensors(path, fm.openclip_spec(1280, 32, vocab=8, proj=1280, dtype="F8_E4M3"))


def sdxl(path: Path) -> Path:
    spec = {
        **fm.prefixed(fm.hf_clip_spec(768, 12, vocab=8, dtype="F8_E4M3"), "conditioner.embedders.0.transformer."),
        **fm.prefixed(
            fm.openclip_spec(1280, 32, vocab=8, proj=1280, dtype="F8_E4M3"), "conditioner.embedders.1.model."
        ),
        **fm.unet_spec(),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    return fm.write_sparse_safetensors(path, spec)


@pytest.fixture
def opens(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every header read (detect.inspect_path opens the file through this name)."""
    seen: list[str] = []
    real = detect_mod.open_file

    def counting(path: str) -> object:
        seen.append(os.fspath(path))
        return real(path)

    monkeypatch.setattr(detect_mod, "open_file", counting)
    return seen


@pytest.fixture
def hashes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    seen: list[str] = []

    def counting(path: str) -> str:
        seen.append(path)
        return sha256_of(path)

    monkeypatch.setattr(library_mod, "sha256_of", counting)
    return seen


@pytest.fixture
def real_shapes(sparse_files: bool) -> None:
    if not sparse_files:
        pytest.skip("real-shape fixtures need a filesystem with sparse files")


def bump_mtime(path: Path, seconds: int = 5) -> None:
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + seconds * 10**9))


def folder_with_bad_files(root: Path) -> Path:
    tiny(root / "a.safetensors")
    tiny(root / "sub" / "b.safetensors", 24)
    tiny(root / "sub" / "deeper" / "c.safetensors", 32)
    (root / "sub" / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json......")
    (root / "empty.pt").write_bytes(b"")
    good = tiny(root / "trunc.safetensors")
    os.truncate(good, os.path.getsize(good) - 100)
    (root / "notes.txt").write_text("not a weights file")
    return root


# ---------------------------------------------------------------------------------------------
# scanning


def test_scan_lists_nested_files_with_bad_ones_reported(tmp_path: Path) -> None:
    lib = EncoderLibrary([str(folder_with_bad_files(tmp_path / "enc"))])
    files = {f.name: f for f in lib.scan()}
    assert set(files) == {
        "a.safetensors",
        "empty.pt",
        "trunc.safetensors",
        "sub/b.safetensors",
        "sub/broken.safetensors",
        "sub/deeper/c.safetensors",
    }
    for name in ("a.safetensors", "sub/b.safetensors", "sub/deeper/c.safetensors"):
        assert files[name].error is None, name
        assert files[name].towers[0].width in (16, 24, 32)
    for name, reason in (("empty.pt", "empty"), ("trunc.safetensors", "truncated"), ("sub/broken.safetensors", "")):
        error = files[name].error
        assert error is not None, name
        assert "\n" not in error
        assert os.path.basename(name) in error
        assert reason in error
    assert files["sub/deeper/c.safetensors"].path == str(tmp_path / "enc" / "sub" / "deeper" / "c.safetensors")
    assert files["a.safetensors"].size == os.path.getsize(tmp_path / "enc" / "a.safetensors")
    assert lib.choices() == []  # nothing usable among tiny towers and broken files


def test_scan_of_several_folders_skips_missing_ones_and_duplicates(tmp_path: Path) -> None:
    first = tmp_path / "one"
    second = tmp_path / "two"
    tiny(first / "x.safetensors")
    tiny(second / "x.safetensors", 24)
    os.symlink(first / "x.safetensors", second / "same-file.safetensors")
    lib = EncoderLibrary([str(first), str(tmp_path / "missing"), str(second)])
    files = lib.scan()
    assert [(f.name, f.towers[0].width) for f in files] == [("x.safetensors", 16), ("x.safetensors", 24)]
    assert lib.resolve("x.safetensors") == str(first / "x.safetensors")  # the earlier folder wins


def test_rescan_uses_the_cache_and_rereads_only_changed_files(tmp_path: Path, opens: list[str]) -> None:
    root = folder_with_bad_files(tmp_path / "enc")
    lib = EncoderLibrary([str(root)])
    first = lib.scan()
    assert len(opens) == 6
    opens.clear()
    second = lib.scan()
    assert opens == []  # stat only
    assert [f.towers for f in second] == [f.towers for f in first]

    bump_mtime(root / "a.safetensors")
    tiny(root / "sub" / "b.safetensors", 48)  # new content, new size
    third = {f.name: f for f in lib.scan()}
    assert sorted(opens) == sorted([str(root / "a.safetensors"), str(root / "sub" / "b.safetensors")])
    assert third["sub/b.safetensors"].towers[0].width == 48


def test_cache_file_persists_across_instances(tmp_path: Path, opens: list[str]) -> None:
    root = folder_with_bad_files(tmp_path / "enc")
    cache = tmp_path / "cache" / "te_switch.json"
    first = EncoderLibrary([str(root)], cache_file=str(cache)).scan()
    assert cache.is_file()
    assert json.loads(cache.read_text())["version"] == library_mod.CACHE_VERSION
    opens.clear()
    again = EncoderLibrary([str(root)], cache_file=str(cache))
    files = again.scan()
    assert opens == []
    assert [(f.name, f.towers) for f in files] == [(f.name, f.towers) for f in first]
    assert not list(cache.parent.glob("*.tmp-*"))  # written atomically, no leftovers


@pytest.mark.parametrize(
    "content",
    [b"{ not json", b"\x00\xff" * 10, b'{"version": 999, "files": {}}', b'{"version": 1, "files": []}', b"[]"],
    ids=["garbage", "binary", "other-version", "files-not-a-dict", "not-an-object"],
)
def test_a_damaged_cache_file_is_ignored(tmp_path: Path, content: bytes, opens: list[str]) -> None:
    root = tmp_path / "enc"
    tiny(root / "a.safetensors")
    cache = tmp_path / "cache.json"
    cache.write_bytes(content)
    lib = EncoderLibrary([str(root)], cache_file=str(cache))
    assert [f.error for f in lib.scan()] == [None]
    assert len(opens) == 1
    assert json.loads(cache.read_text())["version"] == library_mod.CACHE_VERSION  # replaced by a good one


def test_a_cache_entry_from_another_version_is_reread_not_fatal(tmp_path: Path, opens: list[str]) -> None:
    """A cache written by a newer/older release (a TowerInfo field more or less) must not break the scan."""
    root = tmp_path / "enc"
    path = tiny(root / "a.safetensors")
    cache = tmp_path / "cache.json"
    EncoderLibrary([str(root)], cache_file=str(cache)).scan()
    data = json.loads(cache.read_text())
    data["files"][str(path)]["towers"][0]["added_in_a_later_release"] = 1
    cache.write_text(json.dumps(data))
    opens.clear()
    files = EncoderLibrary([str(root)], cache_file=str(cache)).scan()
    assert [f.error for f in files] == [None]
    assert files[0].towers[0].width == 16


# ---------------------------------------------------------------------------------------------
# short hashes


def test_short_hash_is_the_webui_convention_and_computed_once(tmp_path: Path, hashes: list[str]) -> None:
    path = tiny(tmp_path / "enc" / "a.safetensors", metadata={"note": "x" * 5000})
    want = hashlib.sha256(path.read_bytes()).hexdigest()[:10]
    cache = tmp_path / "cache.json"
    lib = EncoderLibrary([str(tmp_path / "enc")], cache_file=str(cache))
    assert lib.short_hash(str(path)) == want
    assert lib.short_hash(str(path)) == want
    assert len(hashes) == 1
    assert EncoderLibrary([str(tmp_path / "enc")], cache_file=str(cache)).short_hash(str(path)) == want
    assert len(hashes) == 1  # the cache file remembers it

    with open(path, "ab") as f:
        f.write(b"\0" * 8)
    assert lib.short_hash(str(path)) == hashlib.sha256(path.read_bytes()).hexdigest()[:10]
    assert len(hashes) == 2


def test_short_hash_survives_a_scan_that_follows_it(tmp_path: Path, hashes: list[str]) -> None:
    """Infotext paste may hash a file before the first scan; the scan must keep that hash."""
    path = tiny(tmp_path / "enc" / "a.safetensors")
    lib = EncoderLibrary([str(tmp_path / "enc")])
    first = lib.short_hash(str(path))
    lib.scan()
    assert lib.short_hash(str(path)) == first
    assert len(hashes) == 1


def test_sharded_index_identity_covers_its_shards(tmp_path: Path, opens: list[str], hashes: list[str]) -> None:
    enc = fm.t5_spec(32, 64, 2, 4, vocab=40)
    dec = fm.t5_decoder_spec(32, 64, 2, 4, vocab=40)
    index = fm.write_sharded(tmp_path / "enc" / "flan", [enc, dec], sparse=True)
    shards = sorted(index.parent.glob("model-*.safetensors"))
    lib = EncoderLibrary([str(tmp_path / "enc")])
    files = lib.scan()
    assert [f.name for f in files] == ["flan/model.safetensors.index.json"]  # shards are not separate entries
    assert files[0].size == os.path.getsize(index) + sum(os.path.getsize(s) for s in shards)
    assert files[0].towers[0].family == "t5"
    assert lib.short_hash(str(index)) == hashlib.sha256(index.read_bytes()).hexdigest()[:10]

    opens.clear()
    lib.scan()
    assert opens == []
    bump_mtime(shards[0])  # a shard re-downloaded: the index file itself did not change
    assert lib.scan()[0].mtime == os.stat(shards[0]).st_mtime
    assert opens == [str(index)]
    lib.short_hash(str(index))
    assert len(hashes) == 2


# ---------------------------------------------------------------------------------------------
# choices, labels, find


@pytest.fixture
def usable(tmp_path: Path, real_shapes: None) -> EncoderLibrary:
    root = tmp_path / "enc"
    clip_l(root / "clip_l_fp8.safetensors")
    clip_l(root / "a" / "same.safetensors")
    clip_l(root / "b" / "same.safetensors")
    clip_g(root / "clip_g.safetensors")
    sdxl(root / "ckpt" / "sdxl.safetensors")
    tiny(root / "tiny.safetensors")
    return EncoderLibrary([str(root)])


def test_choices_and_labels(usable: EncoderLibrary) -> None:
    labels = {c.label: c.kind for c in usable.choices()}
    assert labels == {
        "a/same.safetensors": "clip-l",
        "b/same.safetensors": "clip-l",
        "ckpt/sdxl.safetensors » clip_l": "clip-l",
        "ckpt/sdxl.safetensors » clip_g": "clip-g",
        "clip_g.safetensors": "clip-g",
        "clip_l_fp8.safetensors": "clip-l",
    }
    g_only = usable.choices(("clip-g",))
    assert [c.label for c in g_only] == ["clip_g.safetensors", "ckpt/sdxl.safetensors » clip_g"]  # walk order
    assert {c.label for c in usable.choices(("clip-l", "long-clip-l"))} == {
        "a/same.safetensors",
        "b/same.safetensors",
        "ckpt/sdxl.safetensors » clip_l",
        "clip_l_fp8.safetensors",
    }
    assert usable.choices(("t5-xxl",)) == []


def test_find_by_label_and_unique_basename(usable: EncoderLibrary) -> None:
    g = usable.find("ckpt/sdxl.safetensors » clip_g")
    assert g is not None
    assert g.tower.prefix == "conditioner.embedders.1.model."
    assert usable.find("ckpt/sdxl.safetensors » clip_l").tower.tower == "clip_l"
    assert usable.find("clip_g.safetensors").tower.prefix == ""
    assert usable.find("a/same.safetensors").file.name == "a/same.safetensors"
    assert usable.find("same.safetensors") is None  # two files share the base name: ambiguous
    assert usable.find("clip_l_fp8.safetensors") is not None
    assert usable.find("tiny.safetensors") is None  # listed, but not a usable encoder
    assert usable.find("nope.safetensors") is None
    assert usable.find("sdxl.safetensors") is None  # a whole checkpoint is two choices, never one


def test_find_by_hash(tmp_path: Path, real_shapes: None) -> None:
    root = tmp_path / "enc"
    one = clip_l(root / "one.safetensors", {"v": "1"})
    clip_l(root / "two.safetensors", {"v": "2"})
    clip_l(root / "copy-of-one.safetensors", {"v": "1"})  # the same bytes as one.safetensors
    lib = EncoderLibrary([str(root)])
    h1 = hashlib.sha256(one.read_bytes()).hexdigest()[:10]
    assert lib.find_by_hash(h1, "one.safetensors").label == "one.safetensors"
    assert lib.find_by_hash(h1, "copy-of-one.safetensors").label == "copy-of-one.safetensors"
    assert lib.find_by_hash(h1).label in ("one.safetensors", "copy-of-one.safetensors")
    h2 = lib.short_hash(str(root / "two.safetensors"))
    assert h2 != h1
    assert lib.find_by_hash(h2, "one.safetensors").label == "two.safetensors"  # the hash decides
    assert lib.find_by_hash("0000000000") is None


# ---------------------------------------------------------------------------------------------
# path safety


@pytest.fixture
def jail(tmp_path: Path) -> tuple[EncoderLibrary, Path, Path]:
    root = tmp_path / "enc"
    outside = tiny(tmp_path / "outside.safetensors")
    tiny(root / "in.safetensors")
    tiny(root / "sub" / "deep.safetensors")
    tiny(tmp_path / "enc-evil" / "x.safetensors")  # shares the folder's name as a prefix
    os.symlink(outside, root / "link-out.safetensors")
    os.symlink(tmp_path, root / "dir-out")
    os.symlink(root / "in.safetensors", root / "sub" / "link-in.safetensors")
    return EncoderLibrary([str(root)]), root, outside


def test_resolve_inside_the_folders(jail: tuple[EncoderLibrary, Path, Path]) -> None:
    lib, root, _ = jail
    assert lib.resolve("in.safetensors") == str(root / "in.safetensors")
    assert lib.resolve("sub/deep.safetensors") == str(root / "sub" / "deep.safetensors")
    assert lib.resolve("sub/../in.safetensors") == str(root / "sub" / ".." / "in.safetensors")
    assert lib.resolve(str(root / "in.safetensors")) == str(root / "in.safetensors")
    assert lib.resolve("sub/link-in.safetensors")  # a link that stays inside is fine
    assert lib.contains(str(root))
    assert lib.contains(str(root / "sub" / "deep.safetensors"))


@pytest.mark.parametrize(
    "name",
    [
        "../outside.safetensors",
        "sub/../../outside.safetensors",
        "link-out.safetensors",
        "dir-out/outside.safetensors",
        "../enc-evil/x.safetensors",
    ],
)
def test_resolve_refuses_paths_that_leave_the_folders(jail: tuple[EncoderLibrary, Path, Path], name: str) -> None:
    lib, root, _ = jail
    assert os.path.exists(root / name)  # the target exists: only the location is wrong
    assert not lib.contains(str(root / name))
    with pytest.raises(TESwitchError, match="outside the encoder folders") as err:
        lib.resolve(name)
    assert "\n" not in str(err.value)


def test_resolve_refuses_absolute_paths_outside(jail: tuple[EncoderLibrary, Path, Path]) -> None:
    lib, root, outside = jail
    for path in (str(outside), str(root.parent / "enc-evil" / "x.safetensors"), "/etc/passwd"):
        assert not lib.contains(path)
        with pytest.raises(TESwitchError, match="outside"):
            lib.resolve(path)


def test_resolve_missing_file(jail: tuple[EncoderLibrary, Path, Path]) -> None:
    lib, _, _ = jail
    with pytest.raises(TESwitchError, match="no such file"):
        lib.resolve("sub/missing.safetensors")


def test_resolve_with_several_folders(tmp_path: Path) -> None:
    first, second = tmp_path / "one", tmp_path / "two"
    tiny(first / "a.safetensors")
    tiny(second / "b.safetensors")
    lib = EncoderLibrary([str(first), str(second)])
    assert lib.resolve("b.safetensors") == str(second / "b.safetensors")
    assert lib.contains(str(second / "b.safetensors"))
    with pytest.raises(TESwitchError, match="no such file"):
        lib.resolve("c.safetensors")
