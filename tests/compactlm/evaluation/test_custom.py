"""Tasks of your own by configuration alone: a multiple-choice jsonl with a field mapping, lm-eval task YAMLs in an
include path, mixed with the shipped tasks in one run; every bad input fails before a model loads, naming the field;
standard lm-eval tasks are accepted only when their dataset is in the local HF cache."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from compactlm.config import EvalConfig
from compactlm.evaluation import check_tasks, evaluate_lm, evaluate_model
from compactlm.evaluation.registry import task_inputs
from compactlm.preflight import preflight
from compactlm.recipe import RecipeError, load_recipe

QUIZ = [  # field names of the user's own choosing; answers as the choice text
    {"prompt": "Which planet is known as the red planet?", "options": ["Venus", "Mars", "Jupiter"], "gold": "Mars"},
    {"prompt": "What do bees make?", "options": ["honey", "silk", "wool", "milk"], "gold": "honey"},
    {"prompt": "How many legs has a spider?", "options": ["six", "eight"], "gold": "eight"},
]
MAPPING = {"question": "prompt", "choices": "options", "answer": "gold"}


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _oracle_lm(answers: dict[str, str]):
    """An lm-eval LM that gives the continuation `answers[context]` log-likelihood 0 and every other one -10: it
    scores 1.0 exactly when the task renders the prompts and choices as specified."""
    from lm_eval.api.model import LM

    class Oracle(LM):
        def loglikelihood(self, requests, disable_tqdm=False):
            return [(0.0, True) if answers[r.args[0]] == r.args[1] else (-10.0, False) for r in requests]

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            raise NotImplementedError

        def generate_until(self, requests, disable_tqdm=False):
            raise NotImplementedError

    return Oracle()


def _include_folder(tmp_path: Path) -> Path:
    """A folder of lm-eval task YAMLs as a user writes them: a task that includes a shared base, reads its data by
    a path relative to the YAML and renders the prompt with a !function helper beside it; plus a group."""
    folder = tmp_path / "my_tasks"
    (folder / "data").mkdir(parents=True)
    _write_jsonl(folder / "data" / "capitals.jsonl", [{"country": "France", "capital": "Paris", "wrong": "Rome"},
                                                      {"country": "Japan", "capital": "Tokyo", "wrong": "Seoul"}])
    (folder / "utils.py").write_text("def text(doc):\n    return f\"The capital of {doc['country']} is\"\n")
    (folder / "_base.yaml").write_text(textwrap.dedent("""\
        output_type: multiple_choice
        test_split: test
        doc_to_text: !function utils.text
        doc_to_choice: "{{[capital, wrong]}}"
        doc_to_target: 0
        metric_list:
          - metric: acc
            aggregation: mean
            higher_is_better: true
        """))
    (folder / "capitals.yaml").write_text(textwrap.dedent("""\
        include: _base.yaml
        task: my_capitals
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: data/capitals.jsonl
        """))
    (folder / "group.yaml").write_text("group: my_group\ntask: [my_capitals]\n")
    return folder


def test_jsonl_task_and_include_path_task_run_beside_a_shipped_task(tmp_path):
    quiz = _write_jsonl(tmp_path / "quiz.jsonl", QUIZ)
    folder = _include_folder(tmp_path)
    cfg = EvalConfig(tasks=["compactlm_facts", "my_quiz", "my_capitals"], include_path=str(folder), perplexity=False,
                     jsonl_tasks=[{"name": "my_quiz", "path": str(quiz), **MAPPING}])
    assert check_tasks(cfg) == ["compactlm_facts", "my_quiz", "my_capitals"]
    facts = [json.loads(line) for line in (Path(__file__).parents[3] / "compactlm" / "evaluation" / "tasks" /
                                           "compactlm_facts.jsonl").read_text().splitlines() if line.strip()]
    answers = {f"Question: {r['question']}\nAnswer:": " " + r["choices"][r["answer"]] for r in facts}
    answers |= {f"Question: {r['prompt']}\nAnswer:": " " + r["gold"] for r in QUIZ}
    answers |= {"The capital of France is": " Paris", "The capital of Japan is": " Tokyo"}
    out = evaluate_lm(_oracle_lm(answers), cfg)
    chance = sum(1 / len(r["options"]) for r in QUIZ) / len(QUIZ)  # guessing's expected score, for "% kept"
    assert out["tasks"]["my_quiz"] == {"acc": 1.0, "acc_norm": 1.0, "acc_stderr": None, "acc_norm_stderr": None,
                                       "chance": pytest.approx(chance)}
    assert out["tasks"]["my_capitals"]["acc"] == 1.0 and out["tasks"]["compactlm_facts"]["acc"] == 1.0
    assert out["lm_eval"]["n-samples"]["my_quiz"]["effective"] == 3
    assert out["lm_eval"]["n-samples"]["my_capitals"]["effective"] == 2
    # Every file the listed tasks read keys the cached results: editing one re-evaluates.
    assert task_inputs(cfg) == sorted([str(quiz.resolve()), str(folder.resolve() / "capitals.yaml"),
                                       str(folder.resolve() / "data" / "capitals.jsonl")])


def test_jsonl_task_with_index_answers_scores_a_real_model(tmp_path, tiny_model_dir):
    rows = [{"q": r["prompt"], "c": r["options"], "a": r["options"].index(r["gold"])} for r in QUIZ]
    quiz = _write_jsonl(tmp_path / "quiz.jsonl", rows)
    cfg = EvalConfig(tasks=["quiz"], jsonl_tasks=[{"name": "quiz", "path": str(quiz), "question": "q",
                                                   "choices": "c", "answer": "a"}],
                     perplexity=False, speed=False, batch_size=4)
    result = evaluate_model(tiny_model_dir, cfg)
    assert set(result["tasks"]) == {"quiz"} and 0.0 <= result["tasks"]["quiz"]["acc"] <= 1.0
    assert result["lm_eval"]["n-samples"]["quiz"]["effective"] == 3
    plain = evaluate_model(tiny_model_dir, cfg.model_copy(update={"shared_prefix": False}))
    assert plain["tasks"] == result["tasks"]


@pytest.mark.parametrize(("rows", "mapping", "needle"), [
    (QUIZ, {**MAPPING, "choices": "choices"}, "eval.jsonl_tasks.0.choices: field 'choices' is not in quiz.jsonl "
                                              "line 1 (its fields: prompt, options, gold)"),
    (QUIZ, {**MAPPING, "question": "text"}, "eval.jsonl_tasks.0.question: field 'text' is not in"),
    ([{**QUIZ[0], "gold": "Pluto"}], MAPPING, "eval.jsonl_tasks.0.answer: field 'gold' in quiz.jsonl line 1: answer "
                                              "'Pluto' is neither an index"),
    ([{**QUIZ[0], "gold": 3}], MAPPING, "answer 3 is neither an index into the 3 choices"),
    ([{**QUIZ[0], "gold": 1}, QUIZ[1]], MAPPING, "eval.jsonl_tasks.0.answer: field 'gold' mixes int and str"),
    ([{**QUIZ[0], "options": ["only one"]}], MAPPING, "eval.jsonl_tasks.0.choices: field 'options' in quiz.jsonl "
                                                      "line 1 is not a list of at least two strings"),
    ([], MAPPING, "eval.jsonl_tasks.0.path: "),
])
def test_bad_jsonl_tasks_fail_naming_the_field(tmp_path, rows, mapping, needle):
    quiz = _write_jsonl(tmp_path / "quiz.jsonl", rows)
    cfg = EvalConfig(tasks=["quiz"], jsonl_tasks=[{"name": "quiz", "path": str(quiz), **mapping}])
    with pytest.raises(ValueError) as err:
        check_tasks(cfg)
    assert needle in str(err.value)
    with pytest.raises(ValueError, match="not an HF model directory|eval.jsonl_tasks") as err:
        evaluate_model(tmp_path / "no-model", cfg)  # the task check comes first
    assert needle in str(err.value)


def test_jsonl_task_config_errors_name_the_field(tmp_path):
    quiz = _write_jsonl(tmp_path / "quiz.jsonl", QUIZ)
    (tmp_path / "quiz.txt").write_text("x")
    cases = [
        (["eval.tasks=[quiz]", f"eval.jsonl_tasks=[{{name: quiz, path: {tmp_path}/nope.jsonl}}]"],
         "eval.jsonl_tasks.0.path: .jsonl file not found"),
        (["eval.tasks=[quiz]", f"eval.jsonl_tasks=[{{name: quiz, path: {tmp_path}/quiz.txt}}]"],
         "eval.jsonl_tasks.0.path: give a .jsonl file"),
        (["eval.tasks=[quiz]", f"eval.jsonl_tasks=[{{name: quiz, path: {quiz}, answer_field: gold}}]"],
         "eval.jsonl_tasks.0.answer_field: unknown key"),
        ([f"eval.jsonl_tasks=[{{name: quiz, path: {quiz}}}]"], "jsonl_tasks.0.name: 'quiz' is defined but not listed"),
        (["eval.tasks=[quiz]", f"eval.jsonl_tasks=[{{name: quiz, path: {quiz}}}, {{name: quiz, path: {quiz}}}]"],
         "two tasks are named 'quiz'"),
        ([f"eval.include_path={tmp_path}/none"], "eval.include_path: folder not found"),
    ]
    for overrides, needle in cases:
        with pytest.raises(RecipeError) as err:
            load_recipe("configs/tiny-test.yaml", overrides)
        assert needle in str(err.value), str(err.value)
    # Content problems surface in the preflight, before any compute, as one line naming the field.
    recipe = load_recipe("configs/tiny-test.yaml", ["eval.tasks=[quiz]", f"eval.jsonl_tasks=[{{name: quiz, path: "
                                                                         f"{quiz}, question: prompt, choices: opts, "
                                                                         "answer: gold}]"])
    with pytest.raises(RecipeError, match=r"invalid recipe:\n  eval.jsonl_tasks.0.choices: field 'opts' is not in"):
        preflight(recipe)
    shipped = EvalConfig(tasks=["compactlm_facts"], jsonl_tasks=[{"name": "compactlm_facts", "path": str(quiz)}])
    with pytest.raises(ValueError, match="eval.jsonl_tasks.0.name: 'compactlm_facts' is also a shipped task"):
        check_tasks(shipped)


def test_include_path_errors_name_the_field_and_the_fix(tmp_path):
    folder = _include_folder(tmp_path)
    with pytest.raises(ValueError, match="'my_group' is a group in eval.include_path .*list the tasks it holds"):
        check_tasks(EvalConfig(tasks=["my_group"], include_path=str(folder)))
    (folder / "data" / "capitals.jsonl").unlink()
    with pytest.raises(ValueError, match=r"eval.include_path: task 'my_capitals' \(capitals.yaml\) reads data file "
                                         r".*data/capitals.jsonl, which does not exist \(relative data_files are taken "
                                         r"from the YAML's folder"):
        check_tasks(EvalConfig(tasks=["my_capitals"], include_path=str(folder)))
    (folder / "hub.yaml").write_text("include: _base.yaml\ntask: my_hub\ndataset_path: someone/not_cached_here\n")
    with pytest.raises(ValueError, match=r"task 'my_hub' \(hub.yaml\): its data \(someone/not_cached_here\) comes "
                                         r"from the Hugging Face hub.*not in the local cache"):
        check_tasks(EvalConfig(tasks=["my_hub"], include_path=str(folder)))
    (folder / "clash.yaml").write_text("include: _base.yaml\ntask: compactlm_facts\n")
    with pytest.raises(ValueError, match="eval.include_path: .*clash.yaml defines 'compactlm_facts', the name of a "
                                         "shipped task"):
        check_tasks(EvalConfig(tasks=["compactlm_facts"], include_path=str(folder)))


def test_include_path_task_reads_data_dir_placeholder(tmp_path):
    data = tmp_path / "bench"
    (data / "caps").mkdir(parents=True)
    _write_jsonl(data / "caps" / "c.jsonl", [{"country": "Peru", "capital": "Lima", "wrong": "Quito"}])
    folder = _include_folder(tmp_path)
    (folder / "capitals.yaml").write_text("include: _base.yaml\ntask: my_capitals\ndataset_path: json\n"
                                          "dataset_kwargs:\n  data_files:\n    test: ${data_dir}/caps/c.jsonl\n")
    cfg = EvalConfig(tasks=["my_capitals"], include_path=str(folder), data_dir=str(data), perplexity=False)
    out = evaluate_lm(_oracle_lm({"The capital of Peru is": " Lima"}), cfg)
    assert out["tasks"]["my_capitals"]["acc"] == 1.0


@pytest.mark.integration  # indexes lm-eval's ~220 built-in task folders (~15 s)
def test_standard_tasks_need_their_dataset_in_the_local_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_DATASETS_CACHE", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)  # compactlm evaluates offline unless told otherwise
    with pytest.raises(ValueError, match=r"eval.tasks: 'arc_easy' is a standard lm-eval task and its task 'arc_easy':"
                                         r" its data \(allenai/ai2_arc\) .*use the shipped offline copy "
                                         r"'compactlm_arc_easy'"):
        check_tasks(EvalConfig(tasks=["arc_easy"]))
    with pytest.raises(ValueError, match=r"'ai2_arc' is a standard lm-eval task and its task 'arc_\w+'"):
        check_tasks(EvalConfig(tasks=["ai2_arc"]))  # a tag: its tasks are checked
    with pytest.raises(ValueError, match="unknown task 'my_capitalz'.*eval.include_path"):
        check_tasks(EvalConfig(tasks=["my_capitalz"], include_path=str(_include_folder(tmp_path))))
    # The same task with its dataset in the hub cache (what a download while online leaves behind) passes.
    (tmp_path / "hf" / "hub" / "datasets--allenai--ai2_arc").mkdir(parents=True)
    assert check_tasks(EvalConfig(tasks=["arc_easy"])) == ["arc_easy"]
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")  # downloads allowed: no cache check
    assert check_tasks(EvalConfig(tasks=["copa"])) == ["copa"]
