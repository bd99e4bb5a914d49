"""The full-scale data path on a synthetic image folder: streaming, VAR augmentation, exact resume,
token shards (extraction under 1 and 2 processes, resume, checks on load), sharded sampling, bad
input, and memory that does not grow with the dataset."""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from launching import accelerate_launch, free_port
from PIL import Image

from cartlib import runs, stages, train
from cartlib.__main__ import main
from cartlib.config import load_preset, save_config
from cartlib.data import load_dataset
from cartlib.data.augment import Crop, crop_pil, view
from cartlib.data.stream import ItemSource, StepSampler, StepStream, source_for
from cartlib.data.synthetic import make_image_folder
from cartlib.launch import FULL_SCALE_ON_CPU
from cartlib.shards import ShardError, TokenShards

TOK = {"channels": 8, "ch_mult": [1, 2], "latent_channels": 4, "codebook_size": 32,
       "base_patch_nums": [1, 2, 4, 8], "batch_size": 8, "steps": 2, "ckpt_every": 100}  # fmt: skip
AR = {"depth": 1, "width": 32, "heads": 2, "steps": 3, "batch_size": 8, "ckpt_every": 100}
LAYOUT_TOLERANCE = 5e-5  # tests/test_layout.py's: max |parameter difference| after 3 steps, fp32
VAR_AUG = {"mid_ratio": 1.125, "random_crop": True, "hflip": True}


def scale_cfg(root, resolution=16, **data):
    """A tiny full-scale-style run: image folder, VAR augmentation, per-batch decomposition."""
    data = {"dataset": "imagefolder", "root": str(root), "resolution": resolution,
            "train_limit": None, "test_limit": None, "cache_bases": False, "shard_size": 16,
            "views": 2, **VAR_AUG, **data}  # fmt: skip
    return load_preset("smoke", data=data, decompose={"order": 1}, tokenizer=TOK, ar=AR,
                       mixed_precision="no")  # fmt: skip


def launch(*args, procs=2, timeout=600):
    """``accelerate launch`` of ``-m cartlib ...`` on ``procs`` real CPU processes."""
    return accelerate_launch(["-m", "cartlib", *args], procs, timeout)


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A synthetic folder, a trained tokenizer and the 1-process token shards (the reference);
    one thread, as each process of a 2-process launch has."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    base = tmp_path_factory.mktemp("scale")
    root = make_image_folder(base / "images", images=40, val_images=8, sizes=(14, 40))
    cfg = scale_cfg(root)
    save_config(cfg, base / "config.yaml")
    tok = runs.ensure_tokenizer(cfg, base / "ref", progress=False)
    shards, _, _ = runs.ensure_tokens(cfg, base / "ref", tok, progress=False)
    yield {"base": base, "root": root, "cfg": cfg, "tok": tok, "shards": shards}
    torch.set_num_threads(threads)


# -------------------------------------------------------------------------- stream and augment
def test_var_crop_matches_resize_then_crop(tmp_path):
    """Cropping the source box and resizing it = PIL's resize of the whole image to short side
    1.125 R, then the crop and the mirror (VAR's Resize + RandomCrop + flip), to within 2 levels
    inside the crop (its border may differ: nothing outside the crop bleeds in)."""
    rng = np.random.default_rng(0)
    im = Image.fromarray(rng.integers(0, 256, (6, 10, 3), dtype=np.uint8)).resize((100, 60))
    r, short = 16, 18  # 1.125 x 16
    big = np.asarray(im.resize((30, short), Image.Resampling.BILINEAR)).astype(int)
    for req, (top, left) in [(Crop(0), (1, 7)), (Crop(0, 0.99, 0.0, True), (2, 0))]:
        ref = big[top : top + r, left : left + r]
        ref = ref[:, ::-1] if req.flip else ref
        got = crop_pil(im, r, 1.125, req).astype(int)
        assert got.shape == (r, r, 3) and np.abs(got - ref)[1:-1, 1:-1].max() <= 2


def test_step_batches_depend_on_seed_and_step_only(run):
    """Workers or not, straight or resumed, one process or the union of two: the same batch."""
    source = source_for(run["cfg"].data, "train", progress=False)
    sampler = lambda rank=0, world=1: StepSampler(len(source), 8, 5, rank, world, True, True)
    main_proc = StepStream(source, sampler(), "cpu", 10, workers=0)
    straight = [main_proc(s) for s in range(4)]
    workers = StepStream(source, sampler(), "cpu", 10, workers=2)
    resumed = [workers(s) for s in (2, 3)]  # a resume at step 2
    workers.close()
    for (xa, ya, ia), (xb, yb, ib) in zip(straight[2:], resumed, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and torch.equal(ia, ib)
    halves = [StepStream(source, sampler(r, 2), "cpu", 10)(3) for r in (0, 1)]
    assert sorted(torch.cat([h[2] for h in halves]).tolist()) == sorted(straight[3][2].tolist())
    assert straight[0][0].shape == (8, 3, 16, 16) and 0 <= straight[0][0].min() <= 1


def test_in_memory_fast_path_equals_the_per_item_path():
    ds = load_dataset("fashion-mnist", resolution=28, limit=32, progress=False)
    fast, slow = ItemSource(ds, 28), ItemSource(ds, 28)
    slow.fast = False
    reqs = [Crop(i, None, None, i % 3 == 0) for i in (5, 1, 30, 9)]
    assert fast.fast and all(torch.equal(a, b) for a, b in zip(fast.batch(reqs), slow.batch(reqs)))


def test_tokenizer_streams_and_resumes_exactly(run, tmp_path):
    cfg = run["cfg"].updated(tokenizer={"steps": 4, "ckpt_every": 2})
    _, straight = train.train_tokenizer(cfg, tmp_path / "a", progress=False)
    train.train_tokenizer(cfg, tmp_path / "b", progress=False, stop_after=2)
    _, resumed = train.train_tokenizer(cfg, tmp_path / "b", progress=False)
    assert [h["step"] for h in resumed] == list(range(4))
    for a, b in zip(straight, resumed, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-7)


# ------------------------------------------------------------------------------------- shards
def test_shards_hold_every_view_and_are_memory_mapped(run):
    shards, tok = run["shards"], run["tok"]
    assert len(shards) == 40 and shards.views == 2 and len(shards.shards) == 3
    assert all(isinstance(a, np.memmap) for a in shards._arrays)
    source = source_for(run["cfg"].data, "train", progress=False)
    # the first extraction batch of shard 1 (tokenizer.batch_size = 8 views: images 16-19);
    # the tokenizer decomposes it itself here (the same solver on the same batch)
    d = run["cfg"].data  # VAR's augmentation: two random crops (mirrored: hflip is on here)
    x, _, idx = source.batch(
        [view(i, v, 0, d.random_crop, d.hflip) for i in range(16, 20) for v in (0, 1)]
    )
    maps = tok.encode(x.float() / 255)
    want = torch.cat([m.flatten(1) for m in maps], 1)
    assert torch.equal(shards.rows(idx, torch.tensor([0, 1] * 4)), want)


def test_ar_reads_shards_and_resumes_exactly(run, tmp_path):
    cfg, tok, shards = run["cfg"], run["tok"], run["shards"]
    args = (tok, shards, shards.labels, shards.num_classes)
    _, straight = train.train_ar(cfg, tmp_path / "a", *args, progress=False)
    train.train_ar(cfg, tmp_path / "b", *args, progress=False, stop_after=1)
    _, resumed = train.train_ar(cfg, tmp_path / "b", *args, progress=False)
    for a, b in zip(straight, resumed, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-7)


def test_killed_extraction_resumes_to_the_same_files(run, tmp_path):
    """A kill leaves finished shards, a shard renamed but without its record, and a temp file
    (files are renamed into place, the record last): the rerun encodes only what is missing."""
    ref = run["shards"].folder
    killed = tmp_path / "run"
    shutil.copytree(ref.parent, killed / ref.parent.name)
    folder = killed / ref.parent.name / ref.name
    (folder / "manifest.json").unlink()
    (folder / "shard-00001.json").unlink()
    (folder / "shard-00002.npy").rename(folder / ".shard-00002.npy.tmp")
    for p in folder.glob("shard-00002*"):
        p.unlink()
    kept = (folder / "shard-00000.npy").stat().st_mtime_ns
    assert main(["extract-tokens", "--config", str(run["base"] / "config.yaml"), "--run-dir",
                 str(killed)]) == 0  # fmt: skip
    assert files_of(folder) == files_of(ref)
    assert (folder / "shard-00000.npy").stat().st_mtime_ns == kept


def test_bad_shards_name_the_shard_and_the_rebuild_command(run, tmp_path):
    ref = run["shards"].folder
    folder = tmp_path / ref.name
    shutil.copytree(ref, folder)
    data = (folder / "shard-00001.npy").read_bytes()
    (folder / "shard-00001.npy").write_bytes(data[:-100])
    with pytest.raises(ShardError, match=r"(?s)shard-00001\.npy.*truncated.*extract-tokens"):
        TokenShards(folder, rebuild="accelerate launch -m cartlib extract-tokens ...")
    (folder / "shard-00001.npy").write_bytes(data)
    record = json.loads((folder / "shard-00002.json").read_text())
    (folder / "shard-00002.json").write_text(json.dumps({**record, "tokenizer": "0" * 16}))
    with pytest.raises(ShardError, match=r"(?s)shard-00002.*another tokenizer.*--redo-bad"):
        TokenShards(folder)
    other = train.load_tokenizer(train.tokenizer_dir(run["base"] / "ref", run["cfg"]))
    with torch.no_grad():
        other.quantizer.codebook.weight.add_(1.0)
    with pytest.raises(ShardError, match=r"(?s)another tokenizer.*rm -r .*tokens-train.*extract"):
        runs.ensure_tokens(run["cfg"], run["base"] / "ref", other, progress=False)


# ------------------------------------------------------------------------------ multi-process
def test_two_processes_extract_the_same_tokens_train_and_sample_the_same_images(run):
    """Under ``accelerate launch --num_processes 2``: train-ar extracts the missing tokens (each
    process its shards) and trains; sampling writes the images a single process writes, and a
    killed sampling job (a chunk half written) resumes to the same files."""
    base, cfg = run["base"], run["cfg"]
    ref_tok = train.tokenizer_dir(base / "ref", cfg)
    skip = shutil.ignore_patterns("tokens-*")
    shutil.copytree(ref_tok, train.tokenizer_dir(base / "two", cfg), ignore=skip)
    launch("train-ar", "--config", base / "config.yaml", "--run-dir", base / "two")  # extracts
    two = train.tokenizer_dir(base / "two", cfg) / "tokens-train"
    assert files_of(two) == files_of(run["shards"].folder)  # manifest included
    history = json.loads((train.ar_dir(base / "two", cfg) / "history.json").read_text())
    assert len(history) == cfg.ar.steps and all(np.isfinite(h["loss"]) for h in history)
    one = stages.sample_images(cfg, base / "two", per_class=2, batch=3, progress=False)
    one_files = {p.name: p.read_bytes() for p in sorted((one / "png").iterdir())}
    npz = np.load(one / "samples.npz")["arr_0"]
    shutil.move(one, one.with_name("one-process"))
    args = ("--config", base / "config.yaml", "--run-dir", base / "two", "--per-class", 2)
    launch("sample", *args, "--batch", 3)
    assert {p.name: p.read_bytes() for p in sorted((one / "png").iterdir())} == one_files
    assert np.array_equal(np.load(one / "samples.npz")["arr_0"], npz) and len(npz) == 8
    (one / "png" / "000004.png").unlink()  # a killed sampling job: a chunk half written
    (one / "png" / "000005.png").rename(one / "png" / ".000005.png.tmp")
    stages.sample_images(cfg, base / "two", per_class=2, batch=3, progress=False)
    assert {p.name: p.read_bytes() for p in sorted((one / "png").iterdir())} == one_files


# ---------------------------------------------------------------------------------- bad input
def test_train_and_val_folders_with_different_classes(tmp_path):
    for split, classes in (("train", "abc"), ("val", "ab")):
        for c in classes:
            (tmp_path / split / c).mkdir(parents=True)
            Image.new("RGB", (4, 4)).save(tmp_path / split / c / "x.png")
    with pytest.raises(ValueError, match=r"different class lists: val/ lacks 1 class.*\(c\)"):
        load_dataset("imagefolder", root=str(tmp_path), progress=False)


def test_missing_data_root_fails_first_and_creates_nothing(tmp_path, capsys):
    cfg = scale_cfg(tmp_path / "nowhere")
    save_config(cfg, tmp_path / "config.yaml")
    for stage in ("train-tokenizer", "extract-tokens", "train-ar"):
        code = main(
            [stage, "--config", str(tmp_path / "config.yaml"), "--run-dir", str(tmp_path / "r")]
        )
        out = capsys.readouterr()
        if stage == "train-ar":  # the plan checks the data root first and explains (exit 3)
            assert code == 3 and "nowhere" in out.out + out.err, out
            continue
        assert code == 1 and "nowhere" in out.err and "DatasetUnavailableError" in out.err, out
    assert not list((tmp_path / "r").rglob("*"))  # no tokenizer folder, config or checkpoint


# ------------------------------------------------------------------------------ bounded memory
RSS_SCRIPT = textwrap.dedent(
    """
    import resource, sys
    from cartlib.__main__ import main
    code = main(sys.argv[1:])
    print("MAXRSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, flush=True)
    sys.exit(code)
    """
)
RSS_BOUND_MIB = 16  # what may grow from N to 4N images: file lists and labels, not images or bases


def test_peak_memory_does_not_grow_with_the_dataset(tmp_path):
    """Tokenizer training, extraction and AR training on N and 4N images (32 px, order 3): peak
    RSS of each stage differs by less than RSS_BOUND_MIB (measured: < 0.2 MiB). The old path,
    which held every image and its bases in memory, grew by 26 MiB in the tokenizer stage here,
    and had no extraction stage."""
    n = 500
    root = make_image_folder(tmp_path / "images", images=4 * n, sizes=(32, 64), seed=1)
    for size in (n, 4 * n):
        cfg = scale_cfg(root, 32, train_limit=size, views=1, shard_size=256, workers=0)
        cfg = cfg.updated(tokenizer={"ch_mult": [1, 2, 2]}, decompose={"order": 3})
        save_config(cfg, tmp_path / f"{size}.yaml")
    peaks, procs = {n: {}, 4 * n: {}}, {}
    for stage in ("train-tokenizer", "extract-tokens", "train-ar"):
        for size in (n, 4 * n):  # both sizes at once: memory is what is measured, not time
            args = [stage, "--config", tmp_path / f"{size}.yaml", "--run-dir", tmp_path / str(size)]
            cmd = [sys.executable, "-c", RSS_SCRIPT, *map(str, args)]
            pipe = subprocess.PIPE
            procs[size] = subprocess.Popen(cmd, stdout=pipe, stderr=pipe, text=True)
        for size, proc in procs.items():
            out, err = proc.communicate(timeout=900)
            assert proc.returncode == 0, err[-3000:]
            peaks[size][stage] = int(re.search(r"MAXRSS_KB (\d+)", out).group(1)) / 1024
    growth = {s: peaks[4 * n][s] - peaks[n][s] for s in peaks[n]}
    print("peak RSS MiB", peaks, "growth", growth)
    assert all(g < RSS_BOUND_MIB for g in growth.values()), (peaks, growth)


# ------------------------------------------------------------------ several machines, localhost
def _node_env(**extra) -> dict:
    """One CPU thread per process, no GPU, the venv's ``accelerate`` on PATH, the full-scale
    code path allowed on CPUs."""
    path = f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"
    return {**os.environ, "PATH": path, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
            FULL_SCALE_ON_CPU: "1", **extra}  # fmt: skip


def _run_machines(commands: list[list[str]], envs: list[dict], timeout=600) -> None:
    """Start one command per "machine" at once (each must be up for the rendezvous)."""
    procs = [subprocess.Popen(c, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for c, e in zip(commands, envs)]  # fmt: skip
    outs = [p.communicate(timeout=timeout)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]


def test_two_machines_on_localhost_train_as_one_process_does(run, monkeypatch):
    """A full-scale-shaped run (depth 12, so `train-ar` plans it as a cluster run; width 32) on
    2 machines x 1 process, started exactly as the plan prints it, and by the SLURM script's task
    command with SLURM_NODEID set by hand: both train to the last step and end where one
    process ends, within tests/test_layout.py's tolerance. (Every rank of a multi-node launch
    used to plan 2 processes on its one machine, find 1 GPU "missing" and exit 3.)"""
    from cartlib.cluster import Cluster
    from cartlib.launch import plan_ar
    from cartlib.train.checkpoints import load_latest

    base = run["base"]
    full = run["cfg"].updated(
        ar={"depth": 12, "lr": 0.5, "warmup": 1, "cond_drop": 0.5}, num_processes=2
    )
    tok_dir = train.tokenizer_dir(base / "ref", full)
    for name in ("one", "nodes", "slurm"):  # the same tokenizer and shards in each run dir
        shutil.copytree(tok_dir, train.tokenizer_dir(base / name, full))
    save_config(full, base / "full.yaml")
    monkeypatch.setenv(FULL_SCALE_ON_CPU, "1")
    assert (
        main(["train-ar", "--config", str(base / "full.yaml"), "--run-dir", str(base / "one")]) == 0
    )

    for name in ("nodes", "slurm"):
        cluster = Cluster(2, num_machines=2, main_process_ip="127.0.0.1",
                          main_process_port=free_port())  # fmt: skip
        plan = plan_ar(full, base / name, cluster)
        assert plan.mode == "launch" and plan.problems == [], plan.summary()
        if name == "nodes":  # the printed per-machine commands, as they are
            commands = [shlex.split(c) for c in plan.node_commands]
            envs = [_node_env(), _node_env()]
        else:  # what srun runs on each node of the batch script
            srun = next(
                x for x in plan.slurm_script.read_text().splitlines() if x.startswith("srun")
            )
            commands = [["bash", "-c", shlex.split(srun)[-1]]] * 2
            envs = [_node_env(SLURM_NODEID=str(r), MASTER_ADDR="127.0.0.1") for r in (0, 1)]
        _run_machines(commands, envs)

    tok = run["tok"]
    weights = {n: train.load_ar(train.ar_dir(base / n, full), tok).state_dict()
               for n in ("one", "nodes", "slurm")}  # fmt: skip
    init = _initial_ar(full, tok, train.ar_dir(base / "one", full))
    moved = max((weights["one"][k] - v).abs().max().item() for k, v in init.items())
    for name in ("nodes", "slurm"):
        state, _ = load_latest(train.ar_dir(base / name, full))
        assert state["step"] == full.ar.steps and len(state["rng_ranks"]) == 2  # 2 processes
        diff = max((weights[name][k] - v).abs().max().item() for k, v in weights["one"].items())
        print(f"{name}: 2 machines vs 1 process, {full.ar.steps} steps: max |diff| {diff:.3g}")
        assert diff < LAYOUT_TOLERANCE < moved / 100


def _initial_ar(cfg, tok, folder: Path) -> dict:
    """The transformer's weights before training (every process builds them from ar.seed)."""
    from cartlib.model import build_model

    torch.manual_seed(cfg.ar.seed)
    return build_model(
        cfg, tok.schedule, int((folder / "num_classes.txt").read_text())
    ).state_dict()


def test_gpus_sample_in_the_runs_16_bit_precision_into_their_own_folder(run, monkeypatch):
    """On a GPU the transformer samples under autocast in the run's bf16/fp16 (a 2B model in
    fp32 is ~3x slower); CPUs sample in fp32. The autocast branch is run here on the CPU by
    asking for it: its images are valid and go to a folder of their own."""
    import types

    cfg = run["cfg"].updated(mixed_precision="bf16")
    gpu, cpu = types.SimpleNamespace(type="cuda"), types.SimpleNamespace(type="cpu")
    assert stages.sampling_precision(cfg, gpu) == "bf16"
    assert stages.sampling_precision(cfg.updated(mixed_precision="no"), gpu) is None
    assert stages.sampling_precision(cfg, cpu) is None
    ar_cfg = run["cfg"]
    runs.ensure_ar(ar_cfg, run["base"] / "ref", progress=False)
    plain = stages.sample_images(ar_cfg, run["base"] / "ref", per_class=1, progress=False)
    monkeypatch.setattr(stages, "sampling_precision", lambda cfg, device: "bf16")
    half = stages.sample_images(ar_cfg, run["base"] / "ref", per_class=1, progress=False)
    assert half != plain and json.loads((half / "manifest.json").read_text())["autocast"] == "bf16"
    a, b = np.load(plain / "samples.npz")["arr_0"], np.load(half / "samples.npz")["arr_0"]
    assert a.shape == b.shape and b.dtype == np.uint8 and b.std() > 0


def test_shards_of_a_changed_image_folder_are_refused_not_mixed(run, tmp_path):
    """Images added to (or renamed in) the folder after extraction: extracting again must not
    keep the old shards and encode the new positions in the rest (it did: 44 of 250 images never
    encoded, 44 twice, labels of 158 rows wrong, rc 0)."""
    root = tmp_path / "images"
    shutil.copytree(run["root"], root)
    cfg = scale_cfg(root)
    stages.extract_shards(cfg, tmp_path / "run", run["tok"], progress=False)
    cls = sorted(p for p in (root / "train").iterdir() if p.is_dir())[0]
    first = sorted(cls.iterdir())[0]
    renamed = first.with_name("zz-" + first.name)
    first.rename(renamed)  # same count, another order
    with pytest.raises(ShardError, match=r"stale: the images \(names, sizes or times\) "
                       r"changed since it was extracted"):  # fmt: skip
        stages.extract_shards(cfg, tmp_path / "run", run["tok"], progress=False)
    shutil.copy(renamed, cls / "added.png")  # one more image: another dataset key too
    with pytest.raises(ShardError, match=r"(?s)(dataset|images .*) changed.*rm -r .* && "):
        stages.extract_shards(cfg, tmp_path / "run", run["tok"], progress=False)


@pytest.mark.parametrize("change", ["rewritten", "added"])
def test_training_refuses_shards_of_images_rewritten_or_added_since_extraction(
    run, tmp_path, change
):
    """Issue 37, silently wrong 2-3: images overwritten in place under their names (extraction
    kept the shards byte-identical) or added after extraction (train-ar trained on the old 40
    and ignored the new), rc 0. Now every consumer of the shards compares the data's identity
    (names, sizes, mtimes) with the one they were extracted from, and says the one command that
    rebuilds them, quoted for the shell; with the images not on the machine, they train."""
    root = tmp_path / "rün dir" / "images"
    shutil.copytree(run["root"], root)
    cfg = scale_cfg(root)
    rundir = tmp_path / "rün dir" / "ä b"
    runs.ensure_tokens(cfg, rundir, run["tok"], progress=False)
    images = sorted((root / "train").rglob("*.png"))
    if change == "rewritten":
        for p in images[:20]:  # same names and count, other pixels
            _png_noise(p)
    else:
        for i, p in enumerate(images[:4]):
            shutil.copy(p, p.with_name(f"new-{i}.png"))
    for consumer in (
        lambda: runs.ensure_tokens(cfg, rundir, run["tok"], progress=False),  # train-ar's path
        lambda: stages.extract_shards(cfg, rundir, run["tok"], progress=False),
    ):
        with pytest.raises(ShardError, match=r"stale") as e:
            consumer()
        command = str(e.value).splitlines()[-1].strip()
        assert command.startswith("rm -r '") and "extract-tokens" in command
        folder = shlex.split(command)[2]
        assert Path(folder).name == "tokens-train" and Path(folder).is_dir()
    shutil.move(root, tmp_path / "elsewhere")  # extracted on another machine: not checked
    shards, _, _ = runs.ensure_tokens(cfg, rundir, run["tok"], progress=False)
    assert len(shards) == 40


def _png_noise(path: Path) -> None:
    rng = np.random.default_rng(len(str(path)))
    Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(path)


def test_damaged_token_or_label_values_name_their_shard(run, tmp_path):
    """A flipped high bit in a token, a label out of range: an error naming the shard and how
    to rebuild it, not an IndexError inside F.embedding at some later step. The checksums catch
    both on open; shards written before checksums were recorded are range-checked."""
    folder = shutil.copytree(run["shards"].folder, tmp_path / "tokens-train")
    tokens_path = folder / "shard-00001.npy"
    arr = np.load(tokens_path, mmap_mode="r+")
    arr[0, 0, 5] ^= 0x8000
    arr.flush()
    del arr
    with pytest.raises(ShardError, match=r"shard-00001\.npy is not the file that was written"):
        TokenShards(folder)
    for path in folder.glob("*.json"):  # as written before checksums were recorded
        record = json.loads(path.read_text())
        record.pop("sha256", None)
        for entry in record.get("shards", []):
            entry.pop("sha256")
        path.write_text(json.dumps(record))
    shards = TokenShards(folder)
    n = len(shards)
    with pytest.raises(ShardError, match=r"shard-00001.*beyond the codebook's 32 codes"):
        shards.rows(torch.arange(n), torch.zeros(n, dtype=torch.long))
    labels_path = folder / "shard-00002.labels.npy"
    labels = np.load(labels_path)
    labels[1] += 1000
    np.save(labels_path, labels)
    with pytest.raises(ShardError, match=r"shard-00002.*label 100[0-9] of image .* classes"):
        TokenShards(folder)


def test_extraction_on_a_full_disk_says_so_and_leaves_nothing(run, tmp_path, monkeypatch):
    """The shard files are memory-mapped: without space reserved up front a full disk was a
    SIGBUS (rc 135, no message) at the first page that could not be stored."""
    import errno

    from cartlib.io import DiskFullError

    def no_space(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", no_space)
    with pytest.raises(DiskFullError, match=r"no space left on .*tokens-train.*GB needed"):
        stages.extract_shards(run["cfg"], tmp_path / "run", run["tok"], progress=False)
    folder = train.tokenizer_dir(tmp_path / "run", run["cfg"]) / "tokens-train"
    assert not list(folder.glob(".*.tmp"))


HOLDER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from cartlib.io import dir_lock
    with dir_lock(Path(sys.argv[1]), "holder"):
        Path(sys.argv[2]).write_text("held")
        time.sleep(120)
    """
)


def test_a_second_extract_tokens_on_one_run_waits_for_the_first(run, tmp_path, monkeypatch):
    """Two `extract-tokens` on one run directory wrote the same temporary shard file; the CLI
    now takes the tokenizer folder's lock, as ensure_tokens does."""
    base, cfg = run["base"], run["cfg"]
    run_dir = tmp_path / "run"
    shutil.copytree(train.tokenizer_dir(base / "ref", cfg), train.tokenizer_dir(run_dir, cfg),
                    ignore=shutil.ignore_patterns("tokens-*"))  # fmt: skip
    ready = tmp_path / "ready"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(train.tokenizer_dir(run_dir, cfg)), str(ready)]
    )
    try:
        for _ in range(600):
            if ready.exists():
                break
            holder.poll()
            assert holder.returncode is None
            time.sleep(0.05)
        monkeypatch.setenv("CART_LOCK_TIMEOUT", "0.3")
        args = ["extract-tokens", "--config", str(base / "config.yaml"), "--run-dir", str(run_dir)]
        assert main(args) == 1  # LockTimeout: a user error naming the holder, nothing written
        assert not (train.tokenizer_dir(run_dir, cfg) / "tokens-train").exists()
    finally:
        holder.kill()
        holder.wait()


def test_sampling_on_a_full_disk_names_the_folder_and_leaves_no_temp_file(run, monkeypatch):
    """`sample` on a full disk: a DiskFullError naming the folder and the size (was a bare
    OSError [Errno 28] naming nothing, with a temporary PNG left behind)."""
    import errno

    from cartlib.io import DiskFullError

    cfg = run["cfg"]
    runs.ensure_ar(cfg, run["base"] / "ref", progress=False)
    write_bytes = Path.write_bytes

    def full(self, data):
        if self.name.endswith(".png.tmp"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return write_bytes(self, data)

    monkeypatch.setattr(Path, "write_bytes", full)
    with pytest.raises(DiskFullError, match=r"no space left on .*png.*needed to write 0000"):
        stages.sample_images(cfg, run["base"] / "ref", per_class=1, seed=3, progress=False)
    folders = list((run["base"] / "ref").rglob("png"))
    assert folders and not [p for f in folders for p in f.glob(".*.tmp")]


def test_processes_share_the_header_check_of_an_image_folder(tmp_path):
    """Under a launch of 2 processes each reads half of the image headers and both build the
    same dataset, without the unreadable file (ImageNet: 1.28 M headers once per cluster, not
    once per GPU)."""
    root = make_image_folder(tmp_path / "images", images=24, sizes=(14, 20))
    bad = sorted((root / "train").rglob("*.png"))[5]
    bad.write_bytes(b"not an image")
    accelerate_launch([Path(__file__).with_name("folder_check_probe.py"), root, tmp_path], 2)
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["rank"] for r in reports] == [0, 1] and reports[0]["world"] == 2
    assert [r["read"] for r in reports] == [12, 12]
    assert reports[0]["items"] == reports[1]["items"] and len(reports[0]["items"]) == 23
    assert reports[0]["skipped"] == reports[1]["skipped"] == [str(bad)]


def test_prefetched_steps_are_the_steps_asked_for():
    """The transformer's next token rows are read in a background thread: in order, out of
    order (a resume) and across an error, every call returns fn(step) and errors surface at
    their own step."""
    from cartlib.data.stream import Prefetch

    calls = []

    def fn(step):
        calls.append(step)
        if step == 6:
            raise ValueError("damaged shard at step 6")
        return step * 10

    prefetch = Prefetch(fn, total_steps=8)
    assert [prefetch(s) for s in (0, 1, 2)] == [0, 10, 20]
    assert prefetch(4) == 40 and prefetch(5) == 50  # step 3 was read ahead, then not used
    with pytest.raises(ValueError, match="step 6"):
        prefetch(6)
    assert prefetch(7) == 70
    prefetch.close()
    assert calls == [0, 1, 2, 3, 4, 5, 6, 7]  # nothing read twice, nothing past the last step


def test_full_scale_sampling_is_launched_over_the_processes_and_matches_one(run, monkeypatch):
    """``stages.sample_stage`` (notebook 05's FID samples): a full-scale run's sample set is
    drawn by ``accelerate launch -m cartlib sample`` over the processes (here 2 CPU processes,
    by the explicit opt-in), and holds the files one process draws."""
    from cartlib import launch as launch_module

    base, cfg = run["base"], run["cfg"].updated(num_processes=2)
    shutil.copytree(train.tokenizer_dir(base / "ref", cfg), train.tokenizer_dir(base / "st", cfg))
    runs.ensure_ar(cfg, base / "st", progress=False)
    monkeypatch.setattr(launch_module, "full_scale", lambda c: True)
    monkeypatch.setenv(FULL_SCALE_ON_CPU, "1")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    folder = stages.sample_stage(cfg, base / "st", per_class=2, seed=5, batch=3)
    launched = files_of(folder / "png")
    assert len(launched) == 2 * 4 and (base / "st" / "sample-config.yaml").exists()
    shutil.rmtree(folder)
    monkeypatch.delenv(FULL_SCALE_ON_CPU)  # now drawn here, by this process alone
    again = stages.sample_stage(cfg, base / "st", per_class=2, seed=5, batch=3)
    assert again == folder and files_of(again / "png") == launched


def test_every_bad_shard_is_reencoded_by_one_command_and_the_good_ones_kept(run, tmp_path):
    """Issue 37, finding 9: the advice for a bad shard was an `rm -f` of its files and a rerun,
    one rerun per shard (thousands on ImageNet). Now one `extract-tokens --redo-bad` re-encodes
    every shard that fails its checks and keeps the rest byte for byte."""
    rundir = tmp_path / "run"
    shutil.copytree(run["base"] / "ref", rundir, symlinks=True)
    folder = train.tokenizer_dir(rundir, run["cfg"]) / "tokens-train"
    good = files_of(folder)
    for name in ("shard-00000.npy", "shard-00002.npy"):
        blob = bytearray((folder / name).read_bytes())
        blob[-3] ^= 0x01  # a bit flip inside the codebook's range
        (folder / name).write_bytes(bytes(blob))
    kept = {p: (folder / p).stat().st_mtime_ns for p in ("shard-00001.npy", "shard-00001.json")}
    with pytest.raises(ShardError, match=r"(?s)shard-00000.*sha256.*extract-tokens.* --redo-bad$"):
        stages.extract_shards(run["cfg"], rundir, run["tok"], progress=False)
    stages.extract_shards(run["cfg"], rundir, run["tok"], progress=False, redo_bad=True)
    assert files_of(folder) == good  # the same bytes as a clean extraction
    assert {p: (folder / p).stat().st_mtime_ns for p in kept} == kept  # untouched
