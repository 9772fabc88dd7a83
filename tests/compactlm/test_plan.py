"""The memory plan: sizes read from config.json match the models, each stage's parts follow its settings, and a
stage that does not fit is refused with its numbers and the fix. (How close the plan is to measured peaks is
benchmarks/plan.py's job: docs/benchmarks.md, "memory plan".)"""

from __future__ import annotations

import pytest

from compactlm import footprint as fp
from compactlm import stage_plans as stages
from compactlm.config import DistillConfig, PruneConfig, ScoreConfig
from compactlm.models import count_params_on_disk
from compactlm.plan import Machine, check_fits, host_memory_gib, plan_run, plan_stage, read_config
from compactlm.pruning.shapes import param_count
from compactlm.recipe import load_recipe
from tests.helpers import REPO

SCALING = REPO / "configs" / "scaling"
NODE = Machine(gpus=8, gpu_mem_gib=80, cpu_mem_gib=1024)


@pytest.mark.parametrize("arch,kw", [("llama", {}), ("llama", {"tie_word_embeddings": False}), ("qwen2", {}),
                                     ("phi3", {}), ("gemma2", {})])
def test_sizes_from_config_json_match_the_weights(tiny_factory, arch, kw):
    model = tiny_factory(arch, **kw)
    config = read_config(model)
    d = fp.dims(config)
    assert d.params == count_params_on_disk(model)
    assert d.embed_params + d.layers * d.layer_params == d.params
    shape = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3}
    assert fp.dims(config, shape).params == param_count(config, shape)


def test_fsdp_divides_the_training_state_and_teacher_by_the_ranks(tiny_model_dir):
    d = fp.dims(read_config(tiny_model_dir))
    needs = {(s, n): stages.distill(DistillConfig(strategy=s, nproc=n, batch_size=8), "distill", d, d, True, 8)
             for s, n in (("single", 1), ("ddp", 4), ("fsdp", 2), ("fsdp", 4))}
    state = {k: sum(v for name, v in n.parts.items() if "AdamW" in name) for k, n in needs.items()}
    assert state[("ddp", 4)] == state[("single", 1)] == 2 * state[("fsdp", 2)] == 4 * state[("fsdp", 4)]
    assert needs[("fsdp", 4)].parts["teacher / 4"] == fp.weights(d, "bfloat16") // 4
    assert "gathered units" in needs[("fsdp", 4)].parts and needs[("fsdp", 4)].ranks == 4
    assert needs[("ddp", 4)].parts["ddp gradient buckets"] == fp.weights(d, "float32")


def test_offline_checkpointing_and_micro_batches_shrink_the_step(tiny_model_dir):
    d = fp.dims(read_config(tiny_model_dir))

    def need(**kw):
        return stages.distill(DistillConfig(batch_size=8, seq_len=256, **kw), "distill", d, d, False, 0)

    base = need()
    assert "teacher" in base.parts and "teacher" not in need(mode="offline").parts
    assert need(gradient_checkpointing=True).transient["step"] < base.transient["step"]
    assert need(micro_batch_size=2).transient["step"] * 4 == pytest.approx(base.transient["step"], rel=1e-9)
    assert need(lora={"rank": 4}).parts["grads + AdamW"] < base.parts["grads + AdamW"] / 10
    sampling = stages.distill(DistillConfig(on_policy={"engine": "vllm"}), "distill", d, d, True, 1, 80.0)
    assert sampling.parts["on-policy vLLM sampler"] == int(0.3 * 80 * 2**30)  # the engine's share of the GPU


def test_streaming_holds_a_layer_not_the_model(tiny_gqa_model_dir):
    d = fp.dims(read_config(tiny_gqa_model_dir))
    memory, streaming = (stages.score(ScoreConfig(streaming=s, layer_loss=False), d, False) for s in (False, True))
    assert "weights (fp32)" in memory.parts and "one layer (fp32)" in streaming.parts
    assert streaming.model_bytes < memory.model_bytes
    s = fp.dims(read_config(tiny_gqa_model_dir), {"intermediate_size": 256})
    cut = stages.prune(PruneConfig(intermediate_size=256, streaming=True), d, s, False)
    assert cut.model_bytes < fp.weights(d, "float32")


def test_a_budget_search_holds_a_candidate_per_cpu_it_runs_on(tiny_gqa_model_dir):
    config = read_config(tiny_gqa_model_dir)
    t, s = fp.dims(config), fp.dims(config, {"intermediate_size": 256})
    cfg = PruneConfig(budget={"params": 0.8, "search": 4})
    one, four, many = (stages.prune(cfg, t, s, False, cpus) for cpus in (1, 4, 64))
    assert four.strategy == many.strategy == "budget search, 4 candidates at once"  # never more than `search`
    shared = fp.weights(t, "float32")  # the fp32 teacher's file pages, shared by the candidates
    assert four.transient["4 candidates at once"] - shared == 4 * (one.transient["1 candidates at once"] - shared)
    # a bf16 checkpoint: its pages are shared too; the KL proxy runs the teacher converting one matrix at a time
    # and holds a batch (4 x 256 tokens) of its log-probs
    bf16 = fp.dims(config.__class__(**{**config.to_dict(), "dtype": "bfloat16"}))
    loss = stages.prune(cfg, bf16, s, False, 4).transient["4 candidates at once"]
    kl = stages.prune(PruneConfig(budget={"params": 0.8, "search": 4, "proxy": "kl"}), bf16, s, False, 4)
    assert kl.transient["4 candidates at once"] - loss == 4 * (fp.largest_tensor(bf16) * 4 + fp.logits(bf16, 1024))
    # a repair adds the Gram matrices of a pass to each candidate, and to the final cut
    repair = PruneConfig(budget={"params": 0.8, "search": 4}, repair={"max_memory_gb": 1e-3})
    need = stages.prune(repair, t, s, False, 1)
    grams = max(int(1e-3 * 2**30), 4 * t.intermediate ** 2)
    assert need.transient["1 candidates at once"] - one.transient["1 candidates at once"] == grams
    assert need.transient["final cut"] - one.transient["final cut"] == grams


def test_a_stage_that_does_not_fit_is_named_with_its_numbers_and_the_fix(tiny_model_dir):
    recipe = load_recipe(REPO / "configs/tiny-test.yaml", ["distill.batch_size=64", "distill.seq_len=2048"])
    plan = plan_run(recipe, tiny_model_dir, Machine(cpu_mem_gib=4))
    assert [n.stage for n in plan.needs] == ["generate", "score", "prune", "distill", "evaluate"]
    with pytest.raises(ValueError) as e:
        check_fits(plan)
    need = next(n for n in plan.needs if n.stage == "distill")
    msg = str(e.value)
    assert f"distill (one process, online teacher): needs {need.need_gib():.1f} GiB of host memory, has 4.0 GiB" in msg
    assert "fix: distill.gradient_checkpointing: true, a smaller distill.micro_batch_size" in msg
    assert "score" not in msg.split("\n", 1)[1]  # the stages that fit are not listed
    check_fits(plan_run(recipe, tiny_model_dir, Machine(cpu_mem_gib=1024)))


def test_the_scaling_recipes_fit_one_node_of_eight_80_gb_gpus():
    small = plan_run(load_recipe(SCALING / "llama-8b-to-4b.yaml", []), SCALING / "llama-3.1-8b.json", NODE)
    big = plan_run(load_recipe(SCALING / "llama-70b-to-8b.yaml", []), SCALING / "llama-3.1-70b.json", NODE,
                   SCALING / "llama-3.1-8b.json")
    for plan in (small, big):
        check_fits(plan)
        distill = next(n for n in plan.needs if n.stage == "distill")
        assert distill.device == "gpu" and distill.strategy.startswith("fsdp x 8")
        assert any(n.stage == "distill (host)" and n.ranks == 8 for n in plan.needs)
    # the same 70B run with a full replica per GPU does not fit, and the fix says so
    ddp = plan_run(load_recipe(SCALING / "llama-70b-to-8b.yaml", ["distill.strategy=ddp"]),
                   SCALING / "llama-3.1-70b.json", NODE, SCALING / "llama-3.1-8b.json")
    with pytest.raises(ValueError, match=r"distill \(ddp x 8, online teacher\): needs \d+\.\d GiB per GPU, has 80.0 "
                                         r"GiB; fix: distill.strategy: fsdp with distill.nproc: 8"):
        check_fits(ddp)


def test_a_stage_on_its_own_is_planned_as_in_its_recipe(tiny_model_dir, tiny_factory):
    """A stage flow's plan (its config and models) is the recipe's row for that stage; evaluate and export plan for
    the largest of their models."""
    recipe = load_recipe(REPO / "configs/tiny-test.yaml", ["prune.streaming=true"])
    machine = Machine(cpu_mem_gib=64)
    rows = {n.stage: n for n in plan_run(recipe, tiny_model_dir, machine).needs}
    pruned = fp.dims(read_config(tiny_model_dir), {"num_hidden_layers": 3})
    for stage, cfg in [("generate", recipe.generate), ("score", recipe.score), ("prune", recipe.prune)]:
        (need,) = plan_stage(stage, cfg, machine, {"teacher": tiny_model_dir}).needs
        assert need == rows[stage]
    student = tiny_factory("llama", num_hidden_layers=1)
    distill = plan_stage("distill", recipe.distill, machine, {"teacher": tiny_model_dir, "student": student}).needs
    assert distill == [stages.distill(recipe.distill, "distill", fp.dims(read_config(tiny_model_dir)),
                                      fp.dims(read_config(student)), False, 0)]
    (evaluate,) = plan_stage("evaluate", recipe.eval, machine, {"a": student, "b": tiny_model_dir}).needs
    assert evaluate.per_process == stages.evaluate(recipe.eval, fp.dims(read_config(tiny_model_dir)), pruned,
                                                   False, 0).per_process
    with pytest.raises(ValueError, match="no memory plan for a stage named 'data'"):
        plan_stage("data", recipe.data, machine, {"teacher": tiny_model_dir})


def test_a_given_student_without_a_local_config_is_planned_later(tiny_model_dir):
    recipe = load_recipe(REPO / "configs/tiny-test.yaml", ["student=some-org/some-student"])
    plan = plan_run(recipe, tiny_model_dir, Machine(cpu_mem_gib=64))
    assert [n.stage for n in plan.needs] == ["generate"]
    assert "planned once it is resolved" in plan.notes[0]


def test_host_memory_is_the_env_override_or_at_most_meminfo(monkeypatch):
    monkeypatch.setenv("COMPACTLM_HOST_MEM_GIB", "3.5")
    assert host_memory_gib() == 3.5
    monkeypatch.setenv("COMPACTLM_HOST_MEM_GIB", "lots")
    with pytest.raises(ValueError, match="COMPACTLM_HOST_MEM_GIB='lots' is not a number of GiB"):
        host_memory_gib()
    monkeypatch.delenv("COMPACTLM_HOST_MEM_GIB")
    total = next(int(ln.split()[1]) for ln in open("/proc/meminfo") if ln.startswith("MemTotal:")) / 2**20
    assert 0 < host_memory_gib() <= total


def test_read_config_names_what_is_missing(tmp_path):
    with pytest.raises(ValueError, match="no config.json at"):
        read_config(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="has no model_type"):
        read_config(tmp_path / "config.json")
