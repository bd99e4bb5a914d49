"""Nothing silently wrong, part 2 (issue 27): each test is a case that trained or loaded something
wrong with exit 0, or gave advice that does not work, before it was mended.

Token shards carry checksums (hashed once per process), the last update of a run is checked
before its checkpoint is written, a stage whose newest checkpoint or ``last.pt`` is damaged is
repaired or refused (never consumed as a fallback), a stage folder's hand-edited ``config.yaml``
is named as such, and the decomposition cache resumes part by part.
"""

from __future__ import annotations

import os
import re
import shutil

import numpy as np
import pytest
import torch
import yaml
from test_decompose import Images, cache_home  # noqa: F401  (fixture)
from test_train import tiny_cfg, tiny_data

from cartlib import runs, shards, stages, train
from cartlib.config import ConfigError, load_config
from cartlib.decompose import cache as dcache
from cartlib.shards import Shard, ShardError, ShardWriter, TokenShards, write_manifest
from cartlib.train.checkpoints import CheckpointError, NotNewest, read_manifest

REBUILD = "accelerate launch -m cartlib extract-tokens --config c.yaml --run-dir r"


# ------------------------------------------------------------------------- token shard checksums
def write_shards(folder, n=12, shard_size=4, seq_len=5, codes=32, classes=3):
    """Three finished shards of random tokens, as extraction writes them."""
    folder.mkdir(parents=True)
    g = np.random.default_rng(0)
    meta = {"views": 1, "seq_len": seq_len, "codebook_size": codes, "num_classes": classes,
            "tokenizer": "0123456789abcdef", "dataset": "d", "items": "i"}  # fmt: skip
    plan = [Shard(k, s, min(shard_size, n - s)) for k, s in enumerate(range(0, n, shard_size))]
    for shard in plan:
        writer = ShardWriter(folder, shard, meta)
        writer.write(0, g.integers(0, codes, (shard.count, seq_len), dtype=np.uint16))
        writer.finish(g.integers(0, classes, shard.count).astype(np.int32))
    write_manifest(folder, plan, meta)
    return folder


def test_a_bit_flip_inside_the_codebook_is_caught_naming_the_shard(tmp_path):
    """XOR 0x0001 on every token of a shard stays inside the codebook: train-ar trained on the
    corrupted tokens with rc 0. The sha256 recorded at extraction now catches it on open."""
    folder = write_shards(tmp_path / "tokens-train")
    assert len(TokenShards(folder, rebuild=REBUILD)) == 12
    copy = shutil.copytree(folder, tmp_path / "copy" / "tokens-train")
    arr = np.load(copy / "shard-00001.npy", mmap_mode="r+")
    arr ^= 1
    arr.flush()
    del arr
    with pytest.raises(ShardError, match=r"(?s)shard-00001\.npy.*sha256 differs.*"
                       r"extract-tokens.* --redo-bad"):  # fmt: skip
        TokenShards(copy, rebuild=REBUILD)
    labels = shutil.copytree(folder, tmp_path / "labels" / "tokens-train")
    y = np.load(labels / "shard-00002.labels.npy")
    np.save(labels / "shard-00002.labels.npy", (y + 1) % 3)  # still valid classes
    with pytest.raises(ShardError, match=r"shard-00002\.labels\.npy is not the file that was"):
        TokenShards(labels, rebuild=REBUILD)


def test_shards_are_hashed_once_per_process_and_again_when_written(tmp_path, monkeypatch):
    folder = write_shards(tmp_path / "tokens-train")
    hashed = []
    real = shards.sha256_file
    monkeypatch.setattr(shards, "sha256_file", lambda p: hashed.append(p.name) or real(p))
    TokenShards(folder)
    assert hashed == []  # the writer's digests, remembered
    copy = shutil.copytree(folder, tmp_path / "copy")  # other files: hashed on first open only
    TokenShards(copy)
    assert len(hashed) == 6
    TokenShards(copy)
    assert len(hashed) == 6
    path = copy / "shard-00000.npy"
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # written since: hashed again
    TokenShards(copy)
    assert hashed[6:] == ["shard-00000.npy"]


def test_a_record_whose_checksums_disagree_with_the_manifest_is_refused(tmp_path):
    folder = write_shards(tmp_path / "tokens-train")
    record = folder / "shard-00000.json"
    rec = yaml.safe_load(record.read_text())
    record.write_text(str(rec | {"sha256": {"tokens": "0" * 64, "labels": "0" * 64}}).replace(
        "'", '"'))  # fmt: skip
    with pytest.raises(ShardError, match=r"shard-00000.*checksums differ from those manifest"):
        TokenShards(folder)


# ------------------------------------------------------------------------ the last update checked
def test_an_exploded_last_update_fails_before_its_checkpoint(tmp_path):
    """lr 1e6 with steps 1: the weights are finite (~1e6) but the next loss is NaN; it finished
    with rc 0 as a trained tokenizer that used 4 of its codes."""
    cfg = tiny_cfg(steps=1, ckpt_every=1, lr=1e6)
    with pytest.raises(FloatingPointError, match=r"exploded \(the last update grew them over "
                       r"1000-fold\) after step 1 \(tokenizer: weight norm .* x[0-9.e+]+\); "
                       r"nothing was saved and no checkpoint"):  # fmt: skip
        train.train_tokenizer(cfg, tmp_path, progress=False, data=tiny_data())
    assert not list(train.tokenizer_dir(tmp_path, cfg).glob("step-*.pt"))


# ----------------------------------------------------------- damaged newest checkpoint, last.pt
@pytest.fixture
def finished(tmp_path):
    """A finished tiny tokenizer (2 steps, a checkpoint after each) and its folder."""
    cfg = tiny_cfg(steps=2, ckpt_every=1)
    train.train_tokenizer(cfg, tmp_path, progress=False, data=tiny_data())
    return cfg, train.tokenizer_dir(tmp_path, cfg)


def test_a_dangling_last_link_is_repaired_by_the_stage(finished, tmp_path, capsys):
    """train-tokenizer exited 0 ("finished" per the manifest) and left last.pt dangling."""
    cfg, folder = finished
    last = folder / train.CKPT_NAME
    last.unlink()
    last.symlink_to("step-00000009.pt")
    assert runs.ensure_tokenizer(cfg, tmp_path, progress=False) is not None
    assert last.resolve() == folder / "step-00000002.pt"
    assert "repaired" in capsys.readouterr().out


def test_a_finished_stage_is_not_loaded_from_an_older_checkpoint(finished, tmp_path):
    """The newest checkpoint deleted: load_tokenizer handed out the step-1 model as the finished
    one (a warning only); now it refuses, and the stage itself resumes and repairs."""
    cfg, folder = finished
    (folder / "step-00000002.pt").unlink()
    with pytest.raises(NotNewest, match=r"(?s)no finished model any more.*step-00000002.pt is "
                       r"unusable.*missing.*Train the stage again"):  # fmt: skip
        train.load_tokenizer(folder)
    with pytest.raises(FileNotFoundError, match=r"1 of 2 steps"):  # read from the manifest
        stages.trained("tokenizer", cfg, tmp_path)
    with pytest.warns(UserWarning, match=r"step-00000002.pt is unusable.*using .*step-00000001"):
        train.train_tokenizer(cfg, tmp_path, progress=False, data=tiny_data())  # resumes at 1
    assert read_manifest(folder)[0]["step"] == 2 and train.load_tokenizer(folder) is not None


def test_a_dangling_last_link_without_manifest_and_a_broken_manifest_say_what_to_do(finished):
    _, folder = finished
    (folder / "checkpoints.json").write_text("{")
    with pytest.raises(CheckpointError, match=r"checkpoints.json cannot be read.*Remove it") as e:
        train.load_latest(folder)
    assert isinstance(e.value, ValueError)  # the CLI prints its message without a traceback
    (folder / "checkpoints.json").unlink()
    (folder / "step-00000002.pt").unlink()
    with pytest.raises(CheckpointError, match=r"last.pt links to step-00000002.pt, which is"):
        train.load_latest(folder)


# ------------------------------------------------------------------ a hand-edited config.yaml
@pytest.mark.parametrize("edit", [{"tokenizer": {"channels": 16}}, {"data": {"resolution": 16}}])
def test_an_edited_stage_config_is_named_with_what_to_do(finished, tmp_path, edit):
    """channels 8 -> 16 gave a state-dict size-mismatch traceback, resolution 8 -> 16 advice to
    change base_patch_nums (the wrong fix)."""
    cfg, folder = finished
    config = folder / "config.yaml"
    raw = yaml.safe_load(config.read_text())
    for section, values in edit.items():
        raw[section].update(values)
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    edited = load_config(config)
    want = rf"(?s){re.escape(str(config))} is not the configuration .* edited after training.*cp "
    with pytest.raises(ConfigError, match=want + r".*train-tokenizer --config"):
        train.load_tokenizer(folder)
    with pytest.raises(ConfigError, match=want):
        stages.trained("tokenizer", cfg, tmp_path)
    # the edited file given as --config: no more "train it first" with a folder that is not there
    own = re.escape(train.tokenizer_dir(tmp_path, edited).name)
    with pytest.raises(ConfigError, match=want + rf".*--config \S*{own}\.yaml"):
        stages.trained("tokenizer", edited, tmp_path)


def test_the_command_for_a_missing_stage_names_a_config_that_exists(tmp_path):
    cfg = tiny_cfg(steps=2)
    with pytest.raises(FileNotFoundError, match=r"train it first") as e:
        stages.trained("tokenizer", cfg, tmp_path)
    config = re.search(r"--config (\S+)", str(e.value))[1]
    assert load_config(config).artifact_key("tokenizer") == cfg.resolved().artifact_key("tokenizer")


# --------------------------------------------------------------- decomposition cache resumes
def test_a_killed_decomposition_resumes_from_its_finished_parts(cache_home, monkeypatch):  # noqa: F811
    """A kill lost the whole computation (2,000 images: minutes); now only the part it was in."""
    x = torch.rand(40, 3, 8, 8)
    reference = dcache.decompose_dataset(Images(x, "ref"), order=1, batch_size=4, progress=False)
    calls, real = [], dcache.base_detail

    def killed_after(n):
        def base_detail(*args, **kwargs):
            calls.append(1)
            if len(calls) > n:
                raise KeyboardInterrupt  # the kill
            return real(*args, **kwargs)

        return base_detail

    monkeypatch.setattr(dcache, "base_detail", killed_after(6))  # 4 batches a part: 1 part done
    with pytest.raises(KeyboardInterrupt):
        dcache.decompose_dataset(Images(x), order=1, batch_size=4, progress=False)
    calls.clear()
    monkeypatch.setattr(dcache, "base_detail", killed_after(100))
    bases = dcache.decompose_dataset(Images(x), order=1, batch_size=4, progress=False)
    assert len(calls) == 10 - 4  # 10 batches, the first part's 4 not computed again
    assert torch.equal(bases, reference)
    assert not list(cache_home.glob(".*.parts"))  # removed once the file is written


@pytest.mark.parametrize("name", ["config.yaml", "history.json.gz", "metrics.json"])
def test_a_damaged_shipped_file_is_named_with_the_fix(tmp_path, monkeypatch, name):
    """The shipped folders' files besides the checksummed weights: a damaged one is an error
    naming it and saying how to restore it, not a bare parse error from deep inside."""
    import shutil

    from cartlib import runs, shipped
    from cartlib.config import load_preset

    root = tmp_path / "shipped"
    shutil.copytree(shipped.ROOT, root)
    monkeypatch.setattr(shipped, "ROOT", root)
    from test_shipped import SHIPPED_AT  # where `auto` means fp32, only stages.settle finds them

    cfg = load_preset("tiny", mixed_precision=SHIPPED_AT)
    folder = shipped.find("tokenizer", cfg)
    assert folder is not None
    (folder / name).write_bytes(b"\x00\x01 not what it was")
    says = rf"(?s){name} cannot be read.*git checkout"
    with pytest.raises(shipped.DamagedShippedFile, match=says):
        runs.ensure_tokenizer(cfg, tmp_path / "run", progress=False, shipped=True)


@pytest.mark.parametrize("steps, ckpt_every", [(2, 100), (1, 100), (4, 2)])
def test_a_diverged_transformer_is_never_saved_as_trained(tmp_path, steps, ckpt_every):
    """Issue 37, silently wrong 4: AR at lr 1e4 with 2 steps finished with rc 0 (loss 5.5 ->
    2.5e7, grad norm 5.7e9) and `sample` used it; with 4 steps and a checkpoint every 2 the
    exploded step-2 weights were named "the last good checkpoint". A loss above LOSS_LIMIT x
    ln V stops the run, and the last update is checked on its batch before any save."""
    from test_train import ar_setup

    cfg, tok, tokens, labels = ar_setup(tmp_path, steps=steps, ckpt_every=ckpt_every, lr=1e4)
    why = "diverged at step 1" if steps > 1 else "broken by the last update"
    with pytest.raises(FloatingPointError, match=rf"{why}.*above the limit 13.86.*no checkpoint"):
        train.train_ar(cfg, tmp_path, tok, tokens, labels, 8, progress=False)
    assert not list(train.ar_dir(tmp_path, cfg).glob("step-*.pt"))


def test_whether_a_stage_is_finished_is_read_from_its_manifest_without_unpickling(
    tmp_path, monkeypatch
):
    """Issue 35, finding 7: stages.finished unpickled the whole last.pt (24 GB at d30) to read
    one integer, twice per ensure_ar; now the manifest answers (<= 0.1 s for a 2 GB file)."""
    import json
    import time

    from cartlib.train.checkpoints import MANIFEST, stage_state

    big = tmp_path / "step-00584150.pt"
    with open(big, "wb") as f:  # a 2 GB file that takes no disk (sparse)
        f.truncate(2 * 2**30)
    entry = {"file": big.name, "step": 584150, "sha256": "0" * 64, "bytes": 2 * 2**30}
    (tmp_path / MANIFEST).write_text(json.dumps({"checkpoints": [entry]}))

    def no_loading(*args, **kwargs):
        raise AssertionError("a checkpoint was loaded to answer whether the stage is finished")

    monkeypatch.setattr(torch, "load", no_loading)
    t0 = time.perf_counter()
    assert stages.finished(tmp_path, 584150) and not stages.finished(tmp_path, 584151)
    assert stage_state(tmp_path, 1).status == "finished"
    assert time.perf_counter() - t0 <= 0.1
    big.unlink()  # its file gone: not finished any more
    assert stage_state(tmp_path, 1).status == "missing"
