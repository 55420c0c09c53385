"""CheckpointAnalyzer on real checkpoint files written by transformers, peft, torch and safetensors."""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

from rlhf_tui.analysis.checkpoint import (  # noqa: E402
    CheckpointAnalyzer,
    CheckpointError,
    classify_tensor,
    format_checkpoint_text,
)

TINY = dict(n_layer=2, n_head=2, n_embd=32, vocab_size=128, n_positions=64)


def tiny_gpt2(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(**TINY)
    return transformers.GPT2LMHeadModel(config)


@pytest.fixture(scope="module")
def model():
    return tiny_gpt2()


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt") / "checkpoint-42"
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def weights(saved):
    return safetensors_numpy.load_file(str(saved / "model.safetensors"))


@pytest.fixture
def analyzer():
    return CheckpointAnalyzer()


def save_variant(weights, folder, **changes):
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: np.ascontiguousarray(v) for k, v in weights.items()}
    tensors.update(changes)
    safetensors_numpy.save_file(tensors, str(folder / "model.safetensors"))
    return folder


# ------------------------------------------------------------------------------------------------ healthy


def test_fresh_gpt2_is_healthy_and_stats_match_numpy(analyzer, saved, weights):
    result = analyzer.analyze_checkpoint(str(saved))
    assert result["health_score"] >= 0.9
    assert result["issues"] == [] and result["recommendations"] == []
    assert result["format"] == "safetensors"
    assert result["step"] == 42  # from the checkpoint-42 folder name
    assert result["num_tensors"] == len(weights)
    assert result["num_parameters"] == sum(v.size for v in weights.values())
    assert result["file_size_mb"] == pytest.approx(os.path.getsize(saved / "model.safetensors") / 2**20, abs=1e-3)
    assert "error" not in result
    for name, x in weights.items():
        got = result["weight_stats"][name]
        x64 = x.astype(np.float64).ravel()
        assert got["numel"] == x.size and got["shape"] == list(x.shape) and got["dtype"] == "F32"
        assert got["mean"] == pytest.approx(x64.mean(), abs=1e-7 * max(x64.std(), 1e-12) + 1e-12)
        assert got["std"] == pytest.approx(x64.std(), rel=1e-6, abs=1e-12)
        assert got["min"] == x64.min() and got["max"] == x64.max()
        assert got["norm"] == pytest.approx(np.linalg.norm(x64), rel=1e-6)
        assert got["zero_fraction"] == pytest.approx(np.mean(x64 == 0))
        assert got["nan_count"] == 0 and got["inf_count"] == 0
    kinds = {n: s["kind"] for n, s in result["weight_stats"].items()}
    assert kinds["transformer.wte.weight"] == "embedding"
    assert kinds["transformer.h.0.ln_1.weight"] == "norm"
    assert kinds["transformer.h.0.attn.c_attn.weight"] == "attention"
    assert kinds["transformer.h.1.mlp.c_fc.weight"] == "mlp"
    assert kinds["transformer.h.0.attn.c_attn.bias"] == "bias"
    assert json.loads(json.dumps(result, allow_nan=False)) == result


def test_classify_tensor_names():
    assert classify_tensor("model.layers.3.self_attn.q_proj.weight", (64, 64)) == "attention"
    assert classify_tensor("model.layers.3.mlp.down_proj.weight", (64, 256)) == "mlp"
    assert classify_tensor("model.layers.3.input_layernorm.weight", (64,)) == "norm"
    assert classify_tensor("model.norm.weight", (64,)) == "norm"
    assert classify_tensor("lm_head.weight", (100, 64)) == "embedding"
    assert classify_tensor("base_model.model.h.0.attn.c_attn.lora_B.weight", (96, 4)) == "lora"
    assert classify_tensor("v_head.summary.weight", (1, 64)) == "other"


def test_sharded_layout_matches_single_file(analyzer, model, saved, tmp_path):
    model.save_pretrained(tmp_path, max_shard_size="50KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    sharded = analyzer.analyze_checkpoint(str(tmp_path))
    single = analyzer.analyze_checkpoint(str(saved))
    assert sharded["format"] == "sharded-safetensors"
    assert len(sharded["files"]) > 1
    assert sharded["health_score"] >= 0.9
    assert sharded["weight_stats"].keys() == single["weight_stats"].keys()
    for name, stats in single["weight_stats"].items():
        assert sharded["weight_stats"][name]["norm"] == pytest.approx(stats["norm"], rel=1e-12)


def test_missing_shard_is_an_error(analyzer, model, tmp_path):
    model.save_pretrained(tmp_path, max_shard_size="50KB")
    shard = sorted(p for p in os.listdir(tmp_path) if p.startswith("model-"))[0]
    os.remove(tmp_path / shard)
    result = analyzer.analyze_checkpoint(str(tmp_path))
    assert result["health_score"] == 0.0 and "missing file" in result["error"]
    with pytest.raises(CheckpointError, match="missing file"):
        analyzer.analyze_checkpoint_strict(str(tmp_path))


def test_peft_adapter_layout(analyzer, tmp_path):
    peft = pytest.importorskip("peft", reason="peft is not installed")
    base = tiny_gpt2(1)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True)
    peft.get_peft_model(base, config).save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").exists()
    result = analyzer.analyze_checkpoint(str(tmp_path))
    assert result["format"] == "peft-adapter"
    assert result["health_score"] >= 0.9, result["issues"]
    names = list(result["weight_stats"])
    assert names and all(result["weight_stats"][n]["kind"] == "lora" for n in names)
    lora_b = [n for n in names if "lora_B" in n]
    # PEFT starts lora_B at exactly zero: by design, not an issue.
    assert lora_b and all(result["weight_stats"][n]["zero_fraction"] == 1.0 for n in lora_b)
    assert result["issues"] == []


def test_torch_state_dict_loads_weights_only(analyzer, model, tmp_path, saved):
    path = tmp_path / "step_100.pt"
    torch.save(model.state_dict(), path)
    result = analyzer.analyze_checkpoint(str(path))
    assert result["format"] == "torch-state-dict"
    assert result["step"] == 100  # from the seed's file naming
    assert result["health_score"] >= 0.9
    single = analyzer.analyze_checkpoint(str(saved))
    name = "transformer.h.0.mlp.c_fc.weight"
    assert result["weight_stats"][name]["std"] == pytest.approx(single["weight_stats"][name]["std"], rel=1e-12)


def test_pickle_with_code_is_refused(analyzer, tmp_path):
    marker = tmp_path / "marker-created-by-payload"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.pt"
    torch.save({"weight": torch.ones(4, 4), "extra": Payload()}, path)
    result = analyzer.analyze_checkpoint(str(path))
    assert result["health_score"] == 0.0
    assert result["error"].startswith("refused")
    assert any("pickle with code" in issue for issue in result["issues"])
    assert result["recommendations"]
    with pytest.raises(CheckpointError, match="refused"):
        analyzer.analyze_checkpoint_strict(str(path))
    plain = tmp_path / "evil.bin"
    plain.write_bytes(pickle.dumps({"x": Payload()}))
    assert analyzer.analyze_checkpoint(str(plain))["error"].startswith("refused")
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------ broken


def test_nan_is_critical_and_named(analyzer, weights, tmp_path):
    name = "transformer.h.1.mlp.c_proj.weight"
    bad = weights[name].copy()
    bad[3, 5] = np.nan
    bad[0, 0] = np.inf
    folder = save_variant(weights, tmp_path / "nan", **{name: bad})
    result = analyzer.analyze_checkpoint(str(folder))
    assert result["health_score"] <= 0.5
    assert any("NaN" in i and name in i for i in result["issues"])
    assert any("Inf" in i and name in i for i in result["issues"])
    stats = result["weight_stats"][name]
    assert stats["nan_count"] == 1 and stats["inf_count"] == 1
    finite = bad[np.isfinite(bad)].astype(np.float64)
    assert stats["std"] == pytest.approx(finite.std(), rel=1e-6)
    assert result["recommendations"]


def test_exploding_and_all_zero_tensors(analyzer, weights, tmp_path):
    boom = "transformer.h.0.mlp.c_fc.weight"
    dead = "transformer.h.1.attn.c_attn.weight"
    folder = save_variant(
        weights, tmp_path / "bad", **{boom: weights[boom] * 1000.0, dead: np.zeros_like(weights[dead])}
    )
    result = analyzer.analyze_checkpoint(str(folder))
    assert result["health_score"] <= 0.6
    assert any("exploding" in i and boom in i for i in result["issues"])
    assert any("all-zero" in i and dead in i for i in result["issues"])
    categories = {f["category"] for f in result["findings"]}
    assert {"exploding", "all_zero"} <= categories


def test_bf16_checkpoint(analyzer, tmp_path):
    model = tiny_gpt2(2).to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    result = analyzer.analyze_checkpoint(str(tmp_path))
    assert result["health_score"] >= 0.9
    state = model.state_dict()
    name = "transformer.h.0.attn.c_attn.weight"
    stats = result["weight_stats"][name]
    assert stats["dtype"] == "BF16"
    x = state[name].float().numpy().astype(np.float64)
    assert stats["std"] == pytest.approx(x.std(), rel=1e-6)
    assert stats["max"] == x.max() and stats["min"] == x.min()


def test_truncated_file_and_header(analyzer, saved, tmp_path):
    data = (saved / "model.safetensors").read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: int(len(data) * 0.7)])
    result = analyzer.analyze_checkpoint(str(cut))
    assert result["health_score"] == 0.0 and "truncated data" in result["error"]
    assert any("truncated" in i for i in result["issues"])
    with pytest.raises(CheckpointError, match="truncated data"):
        analyzer.analyze_checkpoint_strict(str(cut))

    head = tmp_path / "head.safetensors"
    head.write_bytes(data[:40])
    result = analyzer.analyze_checkpoint(str(head))
    assert result["health_score"] == 0.0 and "truncated header" in result["error"]
    with pytest.raises(CheckpointError, match="truncated header"):
        analyzer.analyze_checkpoint(str(head), strict=True)


def test_empty_folder_and_missing_path(analyzer, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = analyzer.analyze_checkpoint(str(empty))
    assert result["health_score"] == 0.0 and "no checkpoint weights" in result["error"]
    assert result["recommendations"]
    missing = analyzer.analyze_checkpoint(str(tmp_path / "does-not-exist"))
    assert missing["health_score"] == 0.0 and "missing" in missing["error"]
    with pytest.raises(CheckpointError):
        analyzer.analyze_checkpoint_strict(str(tmp_path / "does-not-exist"))


# ------------------------------------------------------------------------------------------------ drift


def test_drift_against_itself_is_zero(analyzer, saved):
    drift = analyzer.analyze_checkpoint(str(saved), reference_checkpoint=str(saved))["drift"]
    assert drift["overall"] == 0.0
    assert all(v == 0.0 for v in drift["per_tensor"].values())


def test_drift_against_perturbed_copy(analyzer, saved, weights, tmp_path):
    rng = np.random.default_rng(7)
    changed = {}
    for name in ("transformer.h.0.attn.c_attn.weight", "transformer.wte.weight", "transformer.ln_f.weight"):
        x = weights[name]
        changed[name] = (x + rng.standard_normal(x.shape).astype(np.float32) * 0.01).astype(np.float32)
    folder = save_variant(weights, tmp_path / "moved", **changed)
    result = analyzer.analyze_checkpoint(str(folder), reference_checkpoint=str(saved))
    drift = result["drift"]
    diff_total = ref_total = 0.0
    for name, ref in weights.items():
        ref64 = ref.astype(np.float64)
        cur64 = changed.get(name, ref).astype(np.float64)
        d = float(np.sum((cur64 - ref64) ** 2))
        r = float(np.sum(ref64**2))
        diff_total += d
        ref_total += r
        expected = 0.0 if d == 0 else math.sqrt(d / r)
        assert drift["per_tensor"][name] == pytest.approx(expected, rel=1e-6, abs=1e-15)
    assert drift["overall"] == pytest.approx(math.sqrt(diff_total / ref_total), rel=1e-6)
    assert [n for n, _ in drift["top"][:3]] == sorted(changed, key=lambda n: -drift["per_tensor"][n])
    assert result["health_score"] >= 0.9  # small drift is healthy


def test_large_drift_and_structure_mismatch(analyzer, saved, weights, tmp_path):
    name = "transformer.h.1.mlp.c_fc.weight"
    tensors = dict(weights)
    tensors[name] = weights[name] * -2.0  # moved 3× its own size
    del tensors["transformer.wpe.weight"]
    folder = save_variant(tensors, tmp_path / "far")
    result = analyzer.analyze_checkpoint(str(folder), reference_checkpoint=str(saved))
    assert result["drift"]["per_tensor"][name] == pytest.approx(3.0, rel=1e-6)
    assert result["drift"]["top"][0][0] == name
    assert any("moved more than their own size" in i and name in i for i in result["issues"])
    assert any("transformer.wpe.weight" in i for i in result["issues"])
    assert result["health_score"] <= 0.6


def test_unreadable_reference_is_an_issue_not_a_failure(analyzer, saved, tmp_path):
    result = analyzer.analyze_checkpoint(str(saved), reference_checkpoint=str(tmp_path / "nope"))
    assert result["drift"] is None and "error" not in result
    assert any("reference" in i for i in result["issues"])
    assert result["health_score"] >= 0.9  # the reference's problem is not this checkpoint's
    with pytest.raises(CheckpointError):
        analyzer.analyze_checkpoint_strict(str(saved), reference_checkpoint=str(tmp_path / "nope"))


# ------------------------------------------------------------------------------------------------ state, log, text


def test_trainer_state_step_and_learning_rate(analyzer, saved, tmp_path):
    folder = tmp_path / "run"
    shutil.copytree(saved, folder)
    (folder / "trainer_state.json").write_text(
        json.dumps(
            {
                "global_step": 7,
                "log_history": [
                    {"step": 5, "learning_rate": 3e-5, "loss": 1.0},
                    {"step": 7, "learning_rate": 2e-5, "loss": 0.9},
                    {"train_runtime": 1},
                ],
            }
        )
    )
    result = analyzer.analyze_checkpoint(str(folder))
    assert result["step"] == 7 and result["learning_rate"] == pytest.approx(2e-5)
    assert analyzer.analyze_checkpoint(str(folder), step=9)["step"] == 9


def test_output_dir_uses_newest_checkpoint(analyzer, saved, tmp_path):
    for step in (5, 40):
        shutil.copytree(saved, tmp_path / f"checkpoint-{step}")
    result = analyzer.analyze_checkpoint(str(tmp_path))
    assert result["step"] == 40 and result["health_score"] >= 0.9


def test_jsonl_log_is_strict_json(saved, weights, tmp_path):
    name = "transformer.wpe.weight"
    bad = np.full_like(weights[name], np.nan)
    folder = save_variant(weights, tmp_path / "allnan", **{name: bad})
    log_dir = tmp_path / "logs"
    analyzer = CheckpointAnalyzer(log_dir=str(log_dir))
    analyzer.analyze_checkpoint(str(folder))
    analyzer.analyze_checkpoint(str(tmp_path / "missing"))
    lines = (log_dir / "checkpoint_analysis.jsonl").read_text().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON {c}")) for line in lines)
    assert first["weight_stats"][name]["mean"] is None and first["health_score"] <= 0.5
    assert second["health_score"] == 0.0 and second["error"]


def test_format_text(analyzer, saved, weights, tmp_path):
    name = "transformer.h.0.mlp.c_proj.weight"
    bad = weights[name].copy()
    bad[0, 0] = np.nan
    folder = save_variant(weights, tmp_path / "t", **{name: bad})
    result = analyzer.analyze_checkpoint(str(folder), reference_checkpoint=str(saved))
    text = format_checkpoint_text(result)
    assert "health 0." in text and "NaN" in text and name in text and "Recommendations" in text
    assert "Drift vs" in text
    error_text = format_checkpoint_text(analyzer.analyze_checkpoint(str(tmp_path / "missing")))
    assert "unreadable" in error_text and "missing" in error_text


def test_fresh_biases_moving_a_little_are_not_drift(tmp_path):
    """Biases a few steps after a zero init move by more than their own (tiny) size: not an issue."""
    import numpy as np

    from rlhf_tui.analysis.checkpoint import CheckpointAnalyzer

    def write(path, bias):
        from safetensors.numpy import save_file

        rng = np.random.default_rng(0)
        save_file(
            {
                "h.0.mlp.c_fc.weight": rng.normal(0, 0.02, (64, 64)).astype(np.float32),
                "h.0.mlp.c_fc.bias": bias.astype(np.float32),
            },
            str(path),
        )

    write(tmp_path / "ref.safetensors", np.full(64, 1e-4))
    write(tmp_path / "cur.safetensors", np.full(64, 3e-4))
    result = CheckpointAnalyzer().analyze_checkpoint(
        str(tmp_path / "cur.safetensors"), reference_checkpoint=str(tmp_path / "ref.safetensors")
    )
    assert result["drift"]["per_tensor"]["h.0.mlp.c_fc.bias"] > 1.0  # reported as is ...
    assert result["health_score"] == 1.0 and not result["issues"]  # ... but not an issue
