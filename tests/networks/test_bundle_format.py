"""The bundle's format read safely (ichpipe.networks.bundle_format): archives checked from their headers and
manifest before anything is unpacked, manifest names inside the bundle, weights that are only weights (issue 31)."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import tempfile
from pathlib import Path

import pytest
import torch

from ichpipe.base.errors import InputError
from ichpipe.base.files import load_tensors
from ichpipe.networks.bundle_format import load_bundle
from ichpipe.networks.models import load_checkpoint
from tests.e2e.test_bad_input import _bundle_dir


def _manifest(folder: Path) -> None:
    files = {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "manifest.json"}
    (folder / "manifest.json").write_text(json.dumps({"format": 1, "files": files}))


def _archive(path: Path, folder: Path, extra: dict[str, int] | None = None) -> Path:
    """``folder`` as a bundle archive, with ``extra`` members of that many zero bytes added under it."""
    with tarfile.open(path, "w:gz") as tar:
        tar.add(folder, arcname="bundle")
        for name, size in (extra or {}).items():
            info = tarfile.TarInfo(f"bundle/{name}")
            info.size = size
            tar.addfile(info, io.BytesIO(bytes(size)))
    return path


@pytest.fixture
def no_unpacking(monkeypatch, tmp_path):
    """Fails the test if anything is unpacked; the temporary folder is the test's own."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    monkeypatch.setattr(tarfile.TarFile, "extractall", lambda *a, **k: pytest.fail("unpacked"))
    monkeypatch.setattr(tarfile.TarFile, "extract", lambda *a, **k: pytest.fail("unpacked"))
    return temp


def test_an_archive_is_checked_against_its_manifest_before_anything_is_unpacked(tmp_path, no_unpacking):
    folder = _bundle_dir(tmp_path / "b")
    big = _archive(tmp_path / "big.tar.gz", folder, {"cnn/huge.pt": 200 << 20})
    assert big.stat().st_size < 1 << 20
    with pytest.raises(InputError, match=r"big.tar.gz: 'cnn/huge.pt' is not in the bundle's manifest; refusing to "
                                         r"unpack it$"):
        load_bundle(big)  # was: 2 GB unpacked before "not in the manifest"
    # listed in the manifest with its right sha256, but 1000x smaller packed than unpacked: a bomb
    (folder / "cnn").mkdir()
    with open(folder / "cnn" / "zeros.pt", "wb") as f:
        f.write(bytes(50 << 20))
    _manifest(folder)
    listed = _archive(tmp_path / "listed.tar.gz", folder)
    (folder / "cnn" / "zeros.pt").unlink()
    with pytest.raises(InputError, match=r"listed.tar.gz: unpacks to 50 MiB, more than 20x the archive's size"):
        load_bundle(listed)
    assert not list(no_unpacking.iterdir())  # its temporary folder removed


def test_manifest_names_outside_the_bundle_are_refused(tmp_path):
    folder = _bundle_dir(tmp_path / "b")
    (tmp_path / "outside.txt").write_text("a file of the user's")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["../outside.txt"] = hashlib.sha256(b"a file of the user's").hexdigest()
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(InputError, match=r"manifest.json: lists '../outside.txt', which is not a file inside the "
                                         r"bundle; refusing it$"):
        load_bundle(folder)  # was: accepted (README says members outside the folder are refused)
    manifest["files"] = {"/etc/hostname": "0" * 64, "bundle.yaml": manifest["files"]["bundle.yaml"]}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(InputError, match=r"lists '/etc/hostname', which is not a file inside the bundle"):
        load_bundle(folder)


class Payload:  # a pickled object in a weights file: could be anything, code included
    pass


def test_weights_that_hold_pickled_objects_are_one_line_never_loaded(tmp_path):
    path = tmp_path / "fold0_epoch00.pt"
    torch.save({"conv.weight": torch.zeros(2), "extra": Payload()}, path)
    with pytest.raises(InputError) as err:
        load_tensors(path)
    assert str(err.value) == (f"{path}: holds pickled Python objects, not only weights; ichpipe never loads those "
                              "(they could run code)")  # was: an 11-frame traceback suggesting weights_only=False
    with pytest.raises(InputError, match="holds pickled Python objects"):
        load_checkpoint(path, "test_resnet")
    torch.save({"w": torch.ones(3)}, tmp_path / "ok.pt")
    assert load_tensors(tmp_path / "ok.pt")["w"].sum() == 3
    (tmp_path / "cut.pt").write_bytes((tmp_path / "ok.pt").read_bytes()[:100])
    with pytest.raises(InputError, match=r"cut.pt: cannot be read as saved weights"):
        load_tensors(tmp_path / "cut.pt")
