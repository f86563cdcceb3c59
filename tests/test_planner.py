"""The planner (`tensorc plan`): its cost model's formulas, the search, its errors, and its
predictions against Megatron-LM's published Table 1."""

from __future__ import annotations

import dataclasses
import json

import pytest

from tensorc import cli
from tensorc.parallel.planner import (
    HARDWARE,
    MEGATRON_TABLE1,
    PUBLISHED,
    TP_ALL_REDUCES_PER_LAYER,
    VALIDATION_BOUND,
    GiB,
    Model,
    PlanError,
    candidates,
    estimate,
    get_hardware,
    model_from_config,
    search,
    validate,
    validation_table,
)

A100 = HARDWARE["a100"]
SMALL = Model("small", layers=6, hidden=512, heads=8, ffn=2048, vocab=8192, seq=1024)


def run_cli(capsys, *argv):
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


# --- the formulas ---------------------------------------------------------------------

@pytest.mark.parametrize("row", MEGATRON_TABLE1, ids=lambda r: r.name)
def test_flops_and_params_are_the_papers_equations(row):
    """Eq. 3 (flops with recomputation) and eq. 2 (parameters) of Narayanan et al., and the
    table's parameter count."""
    m, B, s, l, h, V = row.model, row.batch, 2048, row.layers, row.hidden, 51200
    eq3 = 96 * B * s * l * h * h * (1 + s / (6 * h) + V / (16 * l * h))
    eq2 = 12 * l * h * h * (1 + 13 / (12 * h) + (V + s) / (12 * l * h))
    assert m.step_flops(B) == pytest.approx(eq3, rel=1e-12)
    assert m.params == pytest.approx(eq2, rel=1e-12)
    # eq. 2 gives 1.65B for the row the table calls 1.7B; the rest within 1.1 %
    assert m.params / 1e9 == pytest.approx(row.params_b, rel=0.03)


def test_the_table_is_transcribed_consistently():
    """Each row's own numbers agree: GPUs = tp pp dp, aggregate = per GPU x GPUs,
    % of peak = per GPU / 312 TFLOP/s (rounding of the published figures aside)."""
    for r in MEGATRON_TABLE1:
        assert r.gpus == r.tp * r.pp * r.dp and r.batch % r.dp == 0, r.name
        assert r.tflops * r.gpus / 1e3 == pytest.approx(r.pflops, rel=0.012), r.name
        assert 100 * r.tflops / 312 == pytest.approx(r.peak_percent, abs=0.6), r.name


def test_activation_bytes_are_korthikantis_formula():
    m = PUBLISHED["gpt-18b"].model
    s, h, a = m.seq, m.hidden, m.heads
    for t in (1, 2, 8):
        for b in (1, 4):
            want = s * b * h * (10 + 24 / t + 5 * a * s / (h * t))
            assert m.layer_activation_bytes(b, t) == pytest.approx(want, rel=1e-12)


def test_memory_of_a_single_device_plan_by_hand():
    """18 bytes per parameter (bf16 weights, fp32 gradients, master weights and moments),
    one layer's inputs kept per layer, one layer's activations while it is recomputed,
    and the fp32 logits with their gradient."""
    b = 2
    plan = estimate(SMALL, A100, 1, 1, 1, b, b)
    act = b * SMALL.seq * SMALL.hidden * 2
    want = (18 * SMALL.params + SMALL.layers * act + SMALL.layer_activation_bytes(b, 1)
            + 8 * b * SMALL.seq * SMALL.vocab)
    assert plan.memory_bytes == pytest.approx(want, rel=1e-12)


def test_memory_of_a_pipeline_by_hand():
    """The first stage of a 1F1B pipeline keeps p micro-batches' layer inputs; the last
    one's plus the logits; both hold ceil(l/p) layers and the embeddings."""
    for model in (SMALL, dataclasses.replace(SMALL, vocab=64)):   # last, first stage most
        plan = estimate(model, A100, 1, 4, 1, 8, 1)               # 2 layers per stage
        act = model.seq * model.hidden * 2
        working = model.layer_activation_bytes(1, 1)
        params = 18 * (2 * model.layer_params + model.embedding_params)
        first = 4 * 2 * act + working
        last = 2 * act + working + 8 * model.seq * model.vocab
        assert plan.memory_bytes == pytest.approx(params + max(first, last), rel=1e-12)
    assert first > last
    interleaved = estimate(model, A100, 1, 4, 1, 8, 1, interleave=2)
    assert interleaved.memory_bytes - plan.memory_bytes == pytest.approx(
        4 * 2 * act * (3 / 8), rel=1e-9)                         # x (1 + (p-1)/(p v))


def test_interleaving_applies_only_where_megatron_allows_it():
    """Whole chunks per stage and micro-batches in rounds of pp, else plain 1F1B."""
    plans = {(p.pp, p.micro_batches): p.interleave
             for p in candidates(SMALL, A100, 8, 16, interleave=2) if p.tp == 1}
    assert plans[(2, 4)] == 1                           # 3 layers per stage
    assert plans[(4, 8)] == plans[(4, 4)] == 2          # 2 layers, m a multiple of 4
    assert plans[(4, 2)] == 1                           # m = 2 < pp


def test_zero1_splits_the_optimizer_state_over_dp():
    dp = 8
    plain = estimate(SMALL, A100, 1, 1, dp, dp, 1)
    zero = estimate(SMALL, A100, 1, 1, dp, dp, 1, zero1=True)
    assert plain.memory_bytes - zero.memory_bytes == pytest.approx(
        12 * SMALL.params * (1 - 1 / dp), rel=1e-12)


def test_bubble_is_p_minus_1_slots_of_m_plus_p_minus_1():
    plan = estimate(SMALL, A100, 1, 3, 1, 8, 1)           # m = 8 micro-batches, p = 3
    assert plan.micro_batches == 8 and plan.bubble == pytest.approx(2 / 10)
    interleaved = estimate(SMALL, A100, 1, 3, 1, 8, 1, interleave=2)
    assert interleaved.bubble == pytest.approx(1 / 9)
    assert interleaved.step_s < plan.step_s


def test_the_step_is_the_sum_of_its_parts():
    for plan in (estimate(SMALL, A100, 2, 3, 2, 16, 2), estimate(SMALL, A100, 8, 1, 1, 4, 1)):
        parts = (plan.compute_s + plan.tp_comm_s + plan.pp_comm_s + plan.dp_comm_s
                 + plan.optimizer_s)
        assert plan.step_s == pytest.approx(parts, rel=1e-12)
        assert plan.tflops_per_device * 1e12 <= A100.peak_flops * A100.gemm_efficiency


def test_tensor_parallel_time_is_six_ring_all_reduces_per_layer():
    t, b = 4, 2
    plan = estimate(SMALL, A100, t, 1, 1, b, b)
    nbytes = b * SMALL.seq * SMALL.hidden * 2
    ring = 2 * (t - 1) / t * nbytes / A100.intra_bandwidth + 2 * (t - 1) * A100.intra_latency
    assert plan.tp_comm_s == pytest.approx(
        TP_ALL_REDUCES_PER_LAYER * SMALL.layers * ring, rel=1e-6)
    assert estimate(SMALL, A100, 1, 1, 1, b, b).tp_comm_s == 0


def test_stages_take_ceil_layers_when_pp_does_not_divide_them():
    """6 layers on 4 stages: the slowest has 2, as on 3 stages."""
    three = estimate(SMALL, A100, 1, 3, 1, 6, 1)
    four = estimate(SMALL, A100, 1, 4, 1, 6, 1)
    per_slot = [p.compute_s / (p.micro_batches + p.pp - 1) for p in (three, four)]
    assert per_slot[0] == pytest.approx(per_slot[1], rel=1e-12)


def test_model_from_zoo_configs():
    from tensorc.models import config
    gpt = model_from_config("gpt", dataclasses.asdict(config("gpt", "small", n_layer=3)))
    assert (gpt.layers, gpt.hidden, gpt.seq, gpt.ffn_matrices) == (3, 512, 1024, 2)
    llama = model_from_config("llama", dataclasses.asdict(config("llama", "small")))
    assert (llama.kv_heads, llama.ffn_matrices) == (2, 3)
    vit = model_from_config("vit", dataclasses.asdict(config("vit", "small")))
    assert vit.seq == (224 // 16) ** 2 + 1


# --- against the published table ------------------------------------------------------

def test_every_published_row_is_predicted_within_the_stated_bound():
    """Each row at its own tp, pp, dp and batch (micro-batch: the planner's choice) within
    VALIDATION_BOUND of its published TFLOP/s per GPU (the docs state the bound and
    list the errors; the constants are shared by all rows)."""
    results = validate()
    assert len(results) == 10
    errors = {r["row"].name: r["error"] for r in results}
    assert all(abs(e) <= VALIDATION_BOUND for e in errors.values()), errors
    for r in results:   # each row's plan fits the A100's memory and is the row's mesh
        p = r["plan"]
        assert (p.tp, p.pp, p.dp) == (r["row"].tp, r["row"].pp, r["row"].dp)
        assert p.memory_bytes <= A100.memory_bytes


def test_the_validation_table_the_docs_show():
    lines = validation_table().splitlines()
    assert len(lines) == 11 and lines[0].split()[:2] == ["model", "tp"]
    assert [ln.split()[0] for ln in lines[1:]] == [r.name for r in MEGATRON_TABLE1]


def test_the_planners_best_mesh_is_the_papers_for_the_end_rows():
    """The 1.7B model's best plan is pure data parallel, the 1T model's the paper's
    tp=8, pp=64 (one node of tensor parallel, pipelines across nodes)."""
    for name, mesh in (("gpt-1.7b", (1, 1)), ("gpt-1t", (8, 64))):
        r = PUBLISHED[name]
        best = search(r.model, A100, r.gpus, r.batch, top=1)[0]
        assert (best.tp, best.pp) == mesh, name


# --- the search -----------------------------------------------------------------------

def test_search_keeps_within_memory_and_sorts_by_step_time():
    r = PUBLISHED["gpt-39b"]
    plans = search(r.model, A100, r.gpus, r.batch, top=6, memory=40 * GiB)
    assert len(plans) == 6
    assert all(p.memory_bytes <= 40 * GiB for p in plans)
    assert [p.step_s for p in plans] == sorted(p.step_s for p in plans)
    assert all(p.tp * p.pp * p.dp == r.gpus and p.tp <= 8 for p in plans)
    roomy = search(r.model, A100, r.gpus, r.batch, top=1)[0]
    assert roomy.step_s <= plans[0].step_s


def test_a_plan_that_fits_nowhere_names_the_memory_it_needs():
    model = PUBLISHED["gpt-1t"].model
    with pytest.raises(PlanError, match=r"smallest needs ([\d.]+) GiB") as e:
        search(model, A100, 8, 8)
    need = float(e.value.args[0].split("smallest needs ")[1].split(" GiB")[0])
    assert search(model, A100, 8, 8, memory=(need + 0.1) * GiB, top=1)


def test_devices_that_do_not_split_for_the_model():
    tiny = Model("tiny", layers=2, hidden=32, heads=4, ffn=64, vocab=97, seq=16)
    with pytest.raises(PlanError, match="do not split"):
        search(tiny, A100, 3, 1)       # tp <= 4 heads, pp <= 2 layers, dp must divide 1


def test_cpu_hardware_is_measured_here():
    hw = get_hardware("cpu")
    assert hw.peak_flops > 1e8 and hw.hbm_bandwidth > 1e8 and hw.memory_bytes > 0
    plans = search(SMALL, hw, hw.devices_per_node, 8, top=2)
    assert plans and all(p.tflops_per_device * 1e12 <= hw.peak_flops for p in plans)


# --- the command ----------------------------------------------------------------------

def test_cli_plan_prints_the_best_plans(capsys):
    rc, out, err = run_cli(capsys, "plan", "gpt-1t", "--devices", 3072, "--top", 3)
    assert rc == 0, err
    lines = out.splitlines()
    assert "1.01e+03B parameters" in lines[0] and "3072 x a100" in lines[0]
    assert lines[1].split()[:3] == ["tp", "pp", "dp"]
    assert lines[2].split()[:4] == ["8", "64", "6", "1"] and len(lines) == 5


def test_cli_plan_json_with_zoo_overrides(capsys):
    rc, out, err = run_cli(capsys, "plan", "gpt", "--preset", "small", "--set", "n_layer=4",
                           "--devices", 8, "--hardware", "h100", "--batch", 16,
                           "--format", "json", "--top", 2, "--zero1")
    assert rc == 0, err
    report = json.loads(out)
    assert report["model"]["layers"] == 4 and report["hardware"]["name"] == "h100"
    assert len(report["plans"]) == 2
    p = report["plans"][0]
    assert p["tp"] * p["pp"] * p["dp"] == 8 and p["zero1"] and p["pflops"] > 0


@pytest.mark.parametrize("argv, message", [
    (["gpt-1t", "--devices", 8], "smallest needs"),
    (["gpt", "--devices", 3, "--batch", 1], "do not split"),
    (["gpt-1t", "--devices", 64, "--memory", 0], "--memory must be"),
    (["gpt-1t", "--devices", 64, "--set", "n_layer=2"], "published configuration"),
    (["nosuch", "--devices", 64], "unknown model"),
    (["gpt", "--devices", 4, "--set", "n_head=0"], "must be positive"),
    (["gpt", "--devices", 2 ** 25], "devices must be from 1 to"),
    (["gpt-1t", "--devices", 3072, "--batch", 10 ** 18, "--memory", 0.001], "smallest needs"),
])
def test_cli_plan_errors_are_one_line(capsys, argv, message):
    rc, out, err = run_cli(capsys, "plan", *argv)
    assert rc == 2 and out == ""
    assert err.startswith("tensorc: error: ") and message in err and err.count("\n") == 1
