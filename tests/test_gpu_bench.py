"""The GPU benchmark's measuring parts and the pre-flight's checks, on CPU (bench/gpu_throughput.py,
bench/gpu_preflight.py; the pre-flight itself runs in CI after the tests, .ci/run)."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
import torch
from script_modules import load_bench

REPO = Path(__file__).resolve().parents[1]


gt = load_bench("gpu_throughput")
pf = load_bench("gpu_preflight")


@pytest.fixture(scope="module")
def pipe():
    return gt.build_pipeline(gt.TINY, torch.device("cpu"), torch.float32, t5_max_length=77)


def _forward(transformer: torch.nn.Module, rows: int = 1, text_tokens: int = 93) -> None:
    c = transformer.config
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, c.in_channels, c.sample_size, c.sample_size, generator=gen)
    ctx = torch.randn(rows, text_tokens, c.joint_attention_dim, generator=gen)
    pooled = torch.randn(rows, c.pooled_projection_dim, generator=gen)
    out = transformer(hidden_states=x, timestep=torch.full((rows,), 500.0), encoder_hidden_states=ctx,
                      pooled_projections=pooled, return_dict=False)[0]
    if torch.is_grad_enabled():
        out.square().mean().backward()


def test_meta_build_materialises_every_tensor_once_with_construction_buffers(pipe) -> None:
    from diffusers import SD3Transformer2DModel

    for name, module in pipe.components.items():
        if isinstance(module, torch.nn.Module):
            tensors = [*module.parameters(), *module.buffers()]
            assert all(t.device.type == "cpu" and torch.isfinite(t.float()).all() for t in tensors), name
    # buffers computed at construction survive materialisation: the sin-cos position table, CLIP's position ids
    plain = SD3Transformer2DModel(**gt.TINY.transformer)
    assert torch.equal(pipe.transformer.pos_embed.pos_embed, plain.pos_embed.pos_embed)
    t5 = pipe.text_encoder_3
    assert t5.shared.weight is t5.encoder.embed_tokens.weight  # tied as in T5 checkpoints
    ids = pipe.text_encoder.text_model.embeddings.position_ids
    assert torch.equal(ids, torch.arange(ids.shape[-1])[None])
    again = gt.build_pipeline(gt.TINY, torch.device("cpu"), torch.float32, t5_max_length=77)
    assert all(torch.equal(a, b) for a, b in zip(pipe.transformer.parameters(), again.transformer.parameters()))
    sizes = gt.component_sizes(pipe)
    assert set(sizes) == {"transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"}


def test_real_text_encoders_are_built_at_full_size_on_meta() -> None:
    """The memory figure's text encoders are the real ones: CLIP-L 124M, CLIP-G 695M, T5-XXL encoder 4.76B."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    clip_l = gt._on_meta(lambda: CLIPTextModelWithProjection(CLIPTextConfig(**gt.CLIP_L)))
    clip_g = gt._on_meta(lambda: CLIPTextModelWithProjection(CLIPTextConfig(**gt.CLIP_G)))
    t5 = gt._on_meta(lambda: T5EncoderModel(T5Config(**gt.T5_XXL)))
    t5.tie_weights()  # materialize() ties it again: one embedding table, as in the checkpoint
    counts = [sum(p.numel() for p in m.parameters()) / 1e6 for m in (clip_l, clip_g, t5)]
    assert counts == pytest.approx([123.7, 694.7, 4762.3], rel=0.01)


def test_flop_count_includes_attention_and_matches_the_closed_form(pipe) -> None:
    """torch's counter has no formula for the CPU attention kernel: the benchmark adds it, and the count then
    equals the closed form exactly (matmuls and attention separately)."""
    from torch.utils.flop_counter import FlopCounterMode

    transformer = pipe.transformer
    with torch.no_grad():
        counted = gt.count_flops(lambda: _forward(transformer))
        plain = FlopCounterMode(display=False)
        with plain:
            _forward(transformer)
    tokens = (transformer.config.sample_size // transformer.config.patch_size) ** 2
    closed = gt.analytic_sd3_flops(transformer, tokens, 93, lora=False)
    assert counted.attention == closed["attention"] > 0
    assert counted.total == closed["matmul"] + closed["attention"]
    assert plain.get_total_flops() == counted.total - counted.attention  # what torch alone would report
    assert gt.agreement(counted.total, closed["matmul"] + closed["attention"])["ok"]


def test_model_flops_leave_out_recomputation_and_hardware_flops_count_it(pipe) -> None:
    transformer = pipe.transformer
    transformer.train()
    try:
        transformer.disable_gradient_checkpointing()
        model = gt.count_flops(lambda: _forward(transformer)).total
        transformer.enable_gradient_checkpointing()
        hardware = gt.count_flops(lambda: _forward(transformer)).total
    finally:
        transformer.disable_gradient_checkpointing()
        transformer.eval()
        transformer.zero_grad(set_to_none=True)
    with torch.no_grad():
        forward = gt.count_flops(lambda: _forward(transformer)).total
    # the recomputed part is the checkpointed blocks' forward: most of one forward, never more
    assert 0.9 * forward < hardware - model <= forward
    assert model > 2 * forward  # forward + backward of the full model


def test_phase_clock_splits_stages_into_phases_and_the_rest() -> None:
    clock = gt.PhaseClock(torch.device("cpu"))
    work = clock.wrap(lambda: sum(range(20000)), "work")
    clock.begin_epoch()
    with clock.stage("rollout"):
        work()
        sum(range(20000))
        work()
    out = clock.end_epoch()["seconds"]
    assert out["rollout/work"] > 0 and out["rollout/other"] >= 0
    assert out["rollout/work"] + out["rollout/other"] == pytest.approx(out["rollout"])
    assert out["epoch"] >= out["rollout"]
    clock.begin_epoch()
    clock.start("a")
    with pytest.raises(RuntimeError, match="inside phase"):
        clock.start("b")


def test_results_are_named_after_the_device_and_peaks_match_the_part(monkeypatch: pytest.MonkeyPatch) -> None:
    assert gt.results_name(torch.device("cpu"), tiny=True) == "gpu_throughput_cpu_tiny.json"
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "NVIDIA H100 80GB HBM3")
    assert gt.results_name(torch.device("cuda"), tiny=False) == "gpu_throughput_nvidia_h100_80gb_hbm3.json"
    assert gt.peak_tflops(torch.device("cuda"), None) == 989.4
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "NVIDIA H100 PCIe")
    assert gt.peak_tflops(torch.device("cuda"), None) == 756.0
    assert gt.peak_tflops(torch.device("cpu"), None) is None


def test_bad_arguments_are_refused_with_the_fix(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        gt.main(["--tiny", "--epochs", "2"])
    assert "--epochs=2" in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            gt.main([])
        assert "pass --tiny" in capsys.readouterr().err


def test_provenance_records_commit_versions_threads_andload_bench() -> None:
    p = gt.provenance()
    assert len(p["commit"]) == 40 or p["commit"].startswith("unknown")
    assert p["versions"]["torch"] and p["torch_threads"] >= 1 and len(p["load_average_start"]) == 3


def _wheel(folder: Path, name: str, version: str, tag: str, requires: list[str]) -> Path:
    path = folder / f"{name}-{version}-{tag}.whl"
    meta = "Metadata-Version: 2.1\nName: {}\nVersion: {}\n{}".format(
        name, version, "".join(f"Requires-Dist: {r}\n" for r in requires))
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name}-{version}.dist-info/METADATA", meta)
    return path


def test_preflight_requirement_check_catches_what_the_gpu_image_lacks(tmp_path: Path) -> None:
    """transformers 5.25 needs huggingface_hub >= 2.4 (the image has 1.33); a package neither on the image nor
    carried; a wheel for another Python. Met and marker-excluded requirements pass."""
    wheels = [
        _wheel(tmp_path, "transformers", "5.25.0", "py3-none-any", ["huggingface-hub<3.0,>=2.4.0", "numpy>=1.17"]),
        _wheel(tmp_path, "fancy", "1.0", "py3-none-any", ["not-on-the-image>=1", "oldthing; python_version<'3.8'"]),
        _wheel(tmp_path, "compiled", "1.0", "cp311-cp311-manylinux_2_17_x86_64", []),
        _wheel(tmp_path, "okay", "1.0", "cp310-abi3-manylinux2014_x86_64", ["fancy>=1", "torch>=2.4"]),
    ]
    problems, _ = pf.check_requirements(wheels, REPO / "pyproject.toml")
    text = "\n".join(problems)
    assert "huggingface-hub<3.0,>=2.4.0; on the GPU image: huggingface-hub 1.33.0" in text
    assert "not-on-the-image>=1: not on the GPU image and not carried" in text
    assert "compiled-1.0-cp311" in text and "oldthing" not in text
    # alignkit's own requirements too: these wheels leave out diffusers and hydra-core
    assert "alignkit requires diffusers" in text and "alignkit requires hydra-core" in text
    assert len(problems) == 5, problems


def test_preflight_out_folder_check_follows_the_device_tools_limits(tmp_path: Path) -> None:
    for i in range(8):
        (tmp_path / f"f{i}.txt").write_text("x")
    assert pf.check_out_folder(tmp_path) == []
    (tmp_path / "a" / "b" / "c").mkdir(parents=True)
    (tmp_path / "a" / "b" / "c" / "deep.txt").write_text("x")
    (tmp_path / "bad name.txt").write_text("x")
    problems = pf.check_out_folder(tmp_path)
    assert any("10 files" in p for p in problems)
    assert any("deeper" in p for p in problems) and any("bad name.txt" in p for p in problems)


def test_summary_figures_from_epochs_as_the_gpu_writes_them(tmp_path: Path) -> None:
    """Medians and ranges, MFU / HFU / useful utilisation and memory per phase, from synthetic epochs shaped as
    the CUDA clock records them (memory present), with round numbers to check the arithmetic."""
    def epoch(rollout_s: float, warmup: bool = False) -> dict:
        return {"warmup": warmup, "samples": 8, "nfe": 80, "prompts": 1, "trained_transitions": 40,
                "distinct_train_inputs": 10, "train_stats": {"first_ratio": 1.0},
                "seconds": {"epoch": rollout_s + 2.0, "rollout": rollout_s, "train": 2.0},
                "memory": {"phases": {"rollout/transformer": {"peak_allocated_gib": rollout_s,
                                                              "allocated_after_gib": 1.0, "reserved_after_gib": 3.0}},
                           "epoch_peak_allocated_gib": 5.0 + rollout_s, "epoch_peak_reserved_gib": 9.0}}

    flops = {"per_row": {"model_eval": 1e12, "decode": 0.0, "encode_prompt": 0.0},
             "per_trained_transition_model": 3e12, "per_trained_transition_hardware": 4e12}
    result = {"recipe": "r", "epochs": [epoch(9.0, warmup=True), epoch(1.0), epoch(2.0), epoch(4.0)], "flops": flops}
    run = gt.Run(tiny=False, device=torch.device("cpu"), workload=gt.TINY_WORKLOAD, epochs=3, out=tmp_path,
                 deadline=None, peak=100.0, ceiling_tflops=50.0, profile=False, out_path=tmp_path / "r.json")
    s = gt.summarize_algo(result, run)
    assert s["timed_epochs"] == 3 and s["seconds"]["rollout"] == {"median": 2.0, "min": 1.0, "max": 4.0, "n": 3}
    fig = s["figures"]
    assert fig["rollout_tflops_per_s"]["median"] == pytest.approx(80 / 2.0)  # 80 evaluations of 1 TFLOP in 2 s
    assert fig["rollout_utilisation"]["median"] == pytest.approx(0.4)
    assert fig["rollout_of_matmul_ceiling"]["median"] == pytest.approx(0.8)
    assert fig["train_model_utilisation"]["median"] == pytest.approx(40 * 3 / 2.0 / 100)
    assert fig["train_hardware_utilisation"]["median"] == pytest.approx(40 * 4 / 2.0 / 100)
    assert fig["train_useful_utilisation"]["median"] == pytest.approx(10 * 3 / 2.0 / 100)
    assert s["memory_peak_allocated_gib"] == 9.0 and s["memory_peak_reserved_gib"] == 9.0
    assert s["memory_phases_gib"]["rollout/transformer"]["peak_allocated_gib"] == 4.0


def test_phase_clock_cuda_bookkeeping_with_a_simulated_allocator(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA branch's bookkeeping (event pairs read after one synchronisation, peak memory per phase and between
    phases), run on CPU against a stand-in for torch.cuda's event and allocator counters."""
    import time

    class Event:
        def __init__(self, enable_timing: bool) -> None:
            self.t = 0.0

        def record(self) -> None:
            self.t = time.perf_counter()

        def elapsed_time(self, end: Event) -> float:
            return (end.t - self.t) * 1e3

    mem = {"now": 1 * gt.GIB, "peak": 1 * gt.GIB}
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a: mem["now"])
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda *a: 8 * gt.GIB)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: mem["peak"])
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda *a: 8 * gt.GIB)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a: mem.update(peak=mem["now"]))

    def allocate(gib: float) -> None:
        mem["now"] += gib * gt.GIB
        mem["peak"] = max(mem["peak"], mem["now"])

    clock = gt.PhaseClock(torch.device("cuda"))
    clock.begin_epoch()
    with clock.stage("train"):
        clock.start("backward")
        allocate(3.0)
        allocate(-3.0)
        clock.stop()
        allocate(5.0)  # between phases: the epoch's peak, no phase's
        allocate(-5.0)
    out = clock.end_epoch()
    assert out["memory"]["phases"]["train/backward"]["peak_allocated_gib"] == pytest.approx(4.0)
    assert out["memory"]["phases"]["train/backward"]["reserved_after_gib"] == pytest.approx(8.0)
    assert out["memory"]["epoch_peak_allocated_gib"] == pytest.approx(6.0)
    assert out["seconds"]["train/backward"] >= 0 and out["seconds"]["train/other"] >= 0
