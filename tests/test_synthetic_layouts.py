"""prepare synthetic --layout ilidsvid|prid2011|lsvid: the layouts the readers take (with ls_set, torchreid's
splits_prid2011.json and LS-VID's HDF5 info_test.mat), byte-identical for any --workers, and --real-sizes plans
with the real counts."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from scipy.io import loadmat

from prepare.cli import main as prepare_main
from prepare.synthetic import generate, make_plan
from prepare.verify import verify

LAYOUTS = ("ilidsvid", "prid2011", "lsvid")


def digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_any_worker_count_gives_the_same_bytes_and_prepare_reads_it(layout, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    generate(layout, one, num_ids=8, seed=3, min_len=2, max_len=30, workers=1, progress=False)
    generate(layout, two, num_ids=8, seed=3, min_len=2, max_len=30, workers=2, progress=False)
    assert digest(one) == digest(two)
    other = tmp_path / "other"
    generate(layout, other, num_ids=8, seed=4, min_len=2, max_len=30, workers=1, progress=False)
    assert digest(other) != digest(one)  # not vacuous
    out = tmp_path / "shards"
    assert prepare_main([layout, "--data-dir", str(one), "--out", str(out), "--workers", "2"]) == 0
    assert verify(out, deep=True) == []


def test_ilidsvid_layout(tmp_path):
    root = tmp_path / "ilids"
    generate("ilidsvid", root, num_ids=6, seed=0, min_len=2, max_len=12, workers=1, progress=False)
    persons = sorted(p.name for p in (root / "i-LIDS-VID" / "sequences" / "cam1").iterdir())
    assert persons == sorted(p.name for p in (root / "i-LIDS-VID" / "sequences" / "cam2").iterdir())
    ls_set = loadmat(root / "train-test people splits" / "train_test_splits_ilidsvid.mat")["ls_set"]
    assert ls_set.shape == (10, 6) and all(sorted(r) == list(range(1, 7)) for r in ls_set.tolist())
    frames = sorted((root / "i-LIDS-VID" / "sequences" / "cam2" / persons[0]).iterdir())
    assert all(f.name.startswith(f"cam2_{persons[0]}_") and f.suffix == ".png" for f in frames)
    assert frames[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_prid2011_layout_and_split_file(tmp_path):
    root = tmp_path / "prid"
    generate("prid2011", root, num_ids=10, seed=0, min_len=5, max_len=40, workers=1, progress=False)
    cams = {c: sorted(p.name for p in (root / "prid_2011" / "multi_shot" / f"cam_{c}").iterdir()) for c in "ab"}
    assert len(cams["a"]) < len(cams["b"]) and cams["a"][:10] == cams["b"][:10]  # 1..10 in both, more in each
    text = (root / "splits_prid2011.json").read_text()
    splits = json.loads(text)
    assert text.startswith('[\n    {\n        "test": [') and len(splits) == 10  # torchreid's file, as written
    kept = set(splits[0]["train"]) | set(splits[0]["test"])
    for name in cams["a"][:10]:
        lengths = [len(list((root / "prid_2011" / "multi_shot" / f"cam_{c}" / name).iterdir())) for c in "ab"]
        assert (name in kept) == (min(lengths) >= 27)  # the protocol's rule, exercised both ways
    assert 0 < len(kept) < 10


def test_lsvid_layout_read_as_the_public_loaders_read_it(tmp_path):
    root = tmp_path / "lsvid"
    generate("lsvid", root, num_ids=12, seed=0, min_len=2, max_len=20, workers=1, progress=False)
    test = [line.split(" ") for line in (root / "list_sequence" / "list_seq_test.txt").read_text().splitlines()]
    query = np.array(h5py.File(root / "test" / "data" / "info_test.mat", "r")["query"][0, :], dtype=int)  # SINet
    assert (root / "test" / "data" / "info_test.mat").read_bytes()[:10] == b"MATLAB 7.3"
    assert len(set(query)) == len(query) and query.min() >= 1 and query.max() <= len(test)
    for prefix, pid in test:
        frames = sorted((root / prefix).parent.glob(Path(prefix).name + "*"))
        assert frames, prefix
        _, _, camid, _ = frames[0].name.split("_")  # BiCnet-TKS: exactly 4 fields, camera third
        assert 1 <= int(camid) <= 15
    assert {int(pid) for _, pid in test} >= {-1}


def test_real_sizes_plans_have_the_real_counts():
    ilids, _ = make_plan("ilidsvid", None, 0, None, None, None, real_sizes=True)
    pids = {t.pid for t in ilids.train}
    assert len(pids) == 300 and len(ilids.train) == 600 and max(pids) <= 319
    assert min(t.length for t in ilids.train) == 23 and max(t.length for t in ilids.train) == 192
    prid, _ = make_plan("prid2011", None, 0, None, None, None, real_sizes=True)
    per_cam = {c: {t.pid for t in prid.train if t.camid == c} for c in (1, 2)}
    assert (len(per_cam[1]), len(per_cam[2])) == (385, 749)
    assert all(len(s["train"]) == len(s["test"]) == 89 for s in prid.meta["splits"])
    lsvid, _ = make_plan("lsvid", None, 0, None, None, None, real_sizes=True)
    assert len({t.pid for t in lsvid.train}) == 3772 and len(lsvid.train) == 14943
    assert len(lsvid.meta["queries"]) == 3504
    assert abs(sum(t.length for t in lsvid.train) / len(lsvid.train) - 200) < 1


@pytest.mark.parametrize("args, message", [
    (["--layout", "ilidsvid", "--scale", "0.5"], "--layout ilidsvid takes --ids or --real-sizes"),
    (["--layout", "prid2011", "--max-len", "20"], "must be at least 27"),
    (["--layout", "lsvid", "--real-sizes", "--ids", "10"], "exclude each other"),
])
def test_options_that_do_not_fit_a_layout_are_one_line(args, message, tmp_path, capsys):
    assert prepare_main(["synthetic", "--out", str(tmp_path / "x"), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "x").exists()
