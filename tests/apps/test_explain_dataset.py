"""explain_dataset: shards and manifest, resume after kill -9, refusal to mix runs, two
processes (torchrun, gloo) identical to one, reading back, the command line, a full disk."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from dataset_models import CountingFiles, tiny_cnn
from PIL import Image

import relprop
from relprop import RelpropError
from relprop.apps.cli import main
from relprop.dataset import ImageFiles, Store, explain_dataset, load_explanations, shards

TESTS = Path(__file__).resolve().parents[1]  # tests/: the helper modules
N, SHARD, BATCH = 24, 5, 3  # 5 shards, the last one short; batches of 3, 3 within a shard
SHARD_FILES = [f"shard-{k:06d}.safetensors" for k in range(5)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """An ImageFolder tree: 3 classes x 8 images of 20x20, each class tinted its colour."""
    root = tmp_path_factory.mktemp("imagefolder")
    rng = np.random.default_rng(0)
    for c in range(3):
        (root / f"class{c}").mkdir()
        for i in range(8):
            pixels = rng.integers(0, 200, (20, 20, 3), dtype=np.uint8)
            pixels[..., c] = 255
            Image.fromarray(pixels).save(root / f"class{c}" / f"img{i}.png")
    return root


def run(folder: Path, out: Path, dataset=None, model=None, **kw) -> relprop.dataset.RunSummary:
    """One run in this process, on one thread like the reference and torchrun's ranks: a
    convolution's bits can depend on the thread count (CI runs with 2)."""
    dataset = dataset if dataset is not None else ImageFiles(folder, size=16)
    low, high = dataset.bounds
    kw.setdefault("composite", "epsilon_gamma_box")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return explain_dataset(model if model is not None else tiny_cnn(), dataset, out,
                               batch_size=BATCH, shard_size=SHARD, progress=False, low=low,
                               high=high, **kw)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(folder, tmp_path_factory) -> Path:
    """One uninterrupted single-process run: what every other way must reproduce."""
    out = tmp_path_factory.mktemp("reference") / "out"
    run(folder, out)
    return out


def assert_same(a: Path, b: Path) -> None:
    """Sample for sample: the same relevance bits, targets, labels, paths, outputs."""
    ea, eb = load_explanations(a), load_explanations(b)
    assert len(ea) == len(eb) == N and ea.indices() == eb.indices() == list(range(N))
    for i in range(N):
        x, y = ea[i], eb[i]
        assert x.keys() == y.keys()
        for key in x:
            if isinstance(x[key], torch.Tensor):
                assert torch.equal(x[key], y[key]), (i, key)
            else:
                assert x[key] == y[key], (i, key)


def listing(out: Path) -> dict[str, tuple[int, int]]:
    """Every file with its inode and modification time: what a rewrite would change."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.iterdir()}


def test_shards_and_manifest_hold_the_explainer_result(folder, reference) -> None:
    names = sorted(p.name for p in reference.iterdir())
    assert names == sorted([*SHARD_FILES, "manifest.json", "run.json"])  # no temp files
    manifest = json.loads((reference / "manifest.json").read_text())
    assert manifest["composite"]["name"] == "epsilon_gamma_box"
    assert manifest["composite"]["by_type"]["conv"]["gamma"] == 0.25
    assert manifest["params"]["low"]["shape"] == [1, 3, 1, 1]
    assert manifest["model"] == "Sequential" and len(manifest["model_fingerprint"]) == 64
    assert manifest["relprop_version"] == relprop.__version__
    assert manifest["classes"] == ["class0", "class1", "class2"]
    rows = manifest["samples"]
    assert [r["index"] for r in rows] == list(range(N))
    assert [(r["shard"], r["offset"]) for r in rows] == [
        (SHARD_FILES[i // SHARD], i % SHARD) for i in range(N)]
    assert [r["label"] for r in rows] == [i // 8 for i in range(N)]
    # the stored relevance is what the Explainer gives for the same batch
    ds = ImageFiles(folder, size=16)
    x = torch.stack([ds[i][0] for i in range(6, 9)])  # shard 1's second batch
    expl = relprop.Explainer(tiny_cnn(), "epsilon_gamma_box", low=ds.bounds[0],
                             high=ds.bounds[1])(x)
    from safetensors.torch import load_file

    shard = load_file(reference / SHARD_FILES[1])
    assert torch.equal(shard["relevance"][1:4], expl.relevance)
    assert torch.equal(shard["target"][1:4], expl.target)
    assert torch.equal(shard["index"], torch.arange(5, 10))
    assert rows[7]["path"] == str(ds.samples[7][0]) and rows[7]["target"] == int(
        expl.target[1])


def test_store_options_sum_what_they_drop(folder, reference, tmp_path) -> None:
    whole = load_explanations(reference)[4]["relevance"]  # (3, 16, 16) float32
    run(folder, tmp_path / "c", store="channels", dtype="float16")
    run(folder, tmp_path / "p", store="pool:3")  # 16 is no multiple of 3: ragged edge
    ch = load_explanations(tmp_path / "c")[4]["relevance"]
    pooled = load_explanations(tmp_path / "p")[4]["relevance"]
    assert ch.dtype == torch.float16 and ch.shape == (16, 16)
    torch.testing.assert_close(ch.float(), whole.sum(0), rtol=2e-3, atol=1e-3)
    assert pooled.shape == (3, 6, 6)
    torch.testing.assert_close(pooled[:, 0, 0], whole[:, :3, :3].sum((1, 2)))
    torch.testing.assert_close(pooled[:, 5, 5], whole[:, 15:, 15:].sum((1, 2)))
    torch.testing.assert_close(pooled.sum(), whole.sum())
    size = {k: (tmp_path / k / SHARD_FILES[0]).stat().st_size for k in ("c", "p")}
    assert size["c"] < (reference / SHARD_FILES[0]).stat().st_size / 4
    assert Store.parse("channels,pool:8").spec == "channels,pool:8"
    with pytest.raises(RelpropError, match="store="):
        Store.parse("pool:x")


KILLED_RUN = """
import sys
sys.path.insert(0, {tests!r})
from dataset_models import CountingFiles, tiny_cnn
from relprop.dataset import explain_dataset
ds = CountingFiles({folder!r}, delay=0.15)
explain_dataset(tiny_cnn(), ds, {out!r}, batch_size={batch}, shard_size={shard},
                progress=False, low=ds.bounds[0], high=ds.bounds[1])
"""


def test_resume_after_kill_9_finishes_the_rest_only(folder, reference, tmp_path) -> None:
    out = tmp_path / "out"
    script = tmp_path / "killed.py"
    script.write_text(KILLED_RUN.format(tests=str(TESTS), folder=str(folder), out=str(out),
                                        batch=BATCH, shard=SHARD))
    proc = subprocess.Popen([sys.executable, str(script)], env=_env())
    try:
        deadline = time.monotonic() + 60
        while not (out / SHARD_FILES[1]).exists():  # two shards done, the third under way
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(0.15)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    finished = [f for f in SHARD_FILES if (out / f).exists()]
    assert 2 <= len(finished) < len(SHARD_FILES) and not (out / "manifest.json").exists()
    before = {k: v for k, v in listing(out).items() if k in finished}

    again = CountingFiles(folder)
    summary = run(folder, out, dataset=again)
    done_earlier = {int(f[6:12]) for f in finished}
    assert set(summary.shards_skipped) == done_earlier
    todo = [i for i in range(N) if i // SHARD not in done_earlier]
    assert sorted(again.seen) == todo  # nothing read, explained or written twice
    after = listing(out)
    assert all(after[k] == v for k, v in before.items())  # finished shards untouched
    assert not any(name.endswith(".tmp") for name in after)
    assert_same(out, reference)


def test_leftover_temp_file_and_missing_shard(folder, reference, tmp_path) -> None:
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    (out / "manifest.json").unlink()
    (out / SHARD_FILES[2]).unlink()
    stale = out / f".{SHARD_FILES[2]}.otherhost.999.tmp"
    stale.write_bytes(b"half a shard")
    before = listing(out)
    again = CountingFiles(folder)
    summary = run(folder, out, dataset=again)
    assert summary.shards_written == [2] and sorted(again.seen) == list(range(10, 15))
    assert not stale.exists()
    after = listing(out)
    assert all(after[f] == before[f] for f in SHARD_FILES if f != SHARD_FILES[2])
    assert_same(out, reference)
    # finished run: running again only rewrites the manifest
    again = CountingFiles(folder)
    assert run(folder, out, dataset=again).shards_written == [] and again.seen == []


@pytest.mark.parametrize("change, message", [
    ({"composite": "epsilon"}, "composite 'epsilon_gamma_box' then, 'epsilon' now"),
    ({"gamma": 0.5}, "differs in by_type"),
    ({"model": "other weights"}, "model weights differ"),
    ({"store": "channels"}, 'store "whole" then, "channels" now'),
])
def test_refuses_to_mix_with_another_run(folder, reference, tmp_path, change,
                                         message) -> None:
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    (out / SHARD_FILES[4]).unlink()  # an unfinished run, which the new one would complete
    before = listing(out)
    if change.get("model"):
        model = tiny_cnn()
        with torch.no_grad():
            model[0].bias.add_(1.0)
        change = {"model": model}
    with pytest.raises(RelpropError, match="holds explanations of another run") as err:
        run(folder, out, **change)
    assert message in str(err.value)
    assert listing(out) == before


def test_two_processes_under_torchrun_match_one(folder, reference, tmp_path) -> None:
    """The command line under torchrun (gloo, 127.0.0.1) gives the API's single-process
    result bit for bit: shards are fixed by index, so each sample is in the same batch."""
    out = tmp_path / "two"
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
                          "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                          "--master_port", str(_free_port()), "-m", "relprop",
                          "explain-dataset", str(folder), "--model", "dataset_models:tiny_cnn",
                          "--size", "16", "--batch-size", str(BATCH), "--shard-size",
                          str(SHARD), "--workers", "1", "--out", str(out)],
                         env=_env(), capture_output=True, text=True, timeout=180)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "rank 0 of 2: explaining 14/14" in two.stderr  # shards 0, 2, 4 on rank 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["model"] == "dataset_models:tiny_cnn"
    assert_same(out, reference)


def test_read_back_lazily_with_class_means_and_grid(folder, reference, tmp_path) -> None:
    expl = load_explanations(reference)
    assert len(expl) == N and 7 in expl and N not in expl
    item = expl[17]
    assert item["index"] == 17 and item["label"] == 2
    assert item["path"].endswith("class2/img1.png")
    assert item["relevance"].shape == (3, 16, 16)
    assert set(item) >= {"relevance", "target", "label", "index", "path", "explained",
                         "output"}
    with pytest.raises(IndexError):
        expl[N]
    means = expl.class_means()
    assert list(means) == [0, 1, 2]
    for c in range(3):
        manual = torch.stack([expl[i]["relevance"] for i in range(N) if i // 8 == c]).mean(0)
        torch.testing.assert_close(means[c], manual)
    by_target = expl.class_means(by="target")
    assert sum(expl.count("target", c) for c in by_target) == N
    png = expl.class_grid(tmp_path / "grid.png")
    assert Image.open(png).size[0] > Image.open(png).size[1] > 0
    with pytest.raises(RelpropError, match="has not finished"):
        (tmp_path / "unfinished").mkdir()
        (tmp_path / "unfinished" / "run.json").write_text("{}")
        load_explanations(tmp_path / "unfinished")


def test_cli_end_to_end(folder, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    code = main(["explain-dataset", str(folder), "--model", "dataset_models:tiny_cnn",
                 "--size", "16", "--out", str(out), "--batch-size", "4", "--shard-size", "10",
                 "--workers", "2", "--store", "channels", "--dtype", "float16",
                 "--target", "label", "--composite", "epsilon_plus"])
    assert code == 0
    err = capsys.readouterr().err
    assert "24/24" in err and "samples/s" in err and "ETA" in err
    assert "manifest" in err
    expl = load_explanations(out)
    assert len(expl) == N and expl.manifest["composite"]["name"] == "epsilon_plus"
    assert [expl[i]["target"] for i in range(N)] == [i // 8 for i in range(N)]
    assert expl[0]["relevance"].dtype == torch.float16
    # clear errors, exit code 2
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert main(["explain-dataset", str(folder), "--model", "dataset_models:tiny_cnn",
                 "--out", str(blocker / "out")]) == 2
    assert "cannot create output folder" in capsys.readouterr().err
    assert main(["explain-dataset", str(folder / "class0"), "--model",
                 "dataset_models:tiny_cnn", "--target", "label", "--out",
                 str(tmp_path / "o2")]) == 2
    assert "needs class sub-folders" in capsys.readouterr().err


def test_unwritable_folder_is_refused_before_any_work(folder, tmp_path,
                                                      monkeypatch) -> None:
    def refused(fh, data):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(shards, "write_through", refused)  # as in a read-only folder
    counting = CountingFiles(folder)
    with pytest.raises(RelpropError, match="cannot write .*Permission denied .*writable"):
        run(folder, tmp_path / "ro", dataset=counting)
    assert counting.seen == [] and list((tmp_path / "ro").iterdir()) == []


def test_disk_full_keeps_finished_shards_and_resumes(folder, reference, tmp_path,
                                                     monkeypatch) -> None:
    out = tmp_path / "out"
    real, calls = shards.write_through, []

    def fills_up(fh, data):
        calls.append(len(data))
        if len(calls) == 5:  # probe, run.json, shard 0, shard 1, then the disk is full
            fh.write(data[:100])
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fh, data)

    monkeypatch.setattr(shards, "write_through", fills_up)
    with pytest.raises(RelpropError, match="disk full while writing .*shard-000002") as err:
        run(folder, out)
    assert "run the same command again to resume" in str(err.value)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["run.json", SHARD_FILES[0], SHARD_FILES[1]]  # no half shard, no temp
    monkeypatch.setattr(shards, "write_through", real)
    assert run(folder, out).shards_written == [2, 3, 4]
    assert_same(out, reference)


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(TESTS.parent / "src"),
                                         env.get("PYTHONPATH", "")])
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
