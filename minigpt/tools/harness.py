"""lm-evaluation-harness on the in-memory (pruned) model, and lm-eval task files for minigpt's cloze sets.

lm-eval is an optional extra (``pip install 'minigpt[lm-eval]'``, i.e. ``lm-eval[hf]``): its HF wrapper
(``HFLM``) takes the loaded model and tokenizer as they are, so per-layer widths need no saving and reloading.
``TaskManager(include_path=...)`` reads local task YAML files; nothing is fetched from a hub when the tasks'
data are local files, as the cloze tasks written here are.
"""

from __future__ import annotations

import os
from pathlib import Path

from minigpt.errors import MiniGPTError

INSTALL_HINT = "lm-eval is not installed: pip install 'lm-eval[hf]' (or minigpt[lm-eval])"


def run_tasks(model, tokenizer, tasks: list[str], *, include_path: str | os.PathLike | None = None,
              limit: int | None = None, batch_size: int = 1) -> dict:
    """``{task: {metric: value}}`` of lm-eval ``tasks`` on ``model``; unknown task names give one-line errors."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise MiniGPTError(INSTALL_HINT) from err
    if include_path is not None and not Path(include_path).is_dir():
        raise MiniGPTError(f"--lm-eval-include {include_path} is not a directory of task files")
    manager = TaskManager(include_path=str(include_path) if include_path else None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise MiniGPTError(f"unknown lm-eval task(s) {', '.join(unknown)} (local task files: --lm-eval-include DIR)")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    out = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit, log_samples=False)
    return {task: {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
            for task, metrics in out["results"].items()}


def cloze_task_yaml(name: str, questions: str | os.PathLike) -> str:
    """An lm-eval ``multiple_choice`` task over minigpt's question JSON lines (``question``, ``choices``,
    ``answer``): ``acc`` compares summed log-likelihoods (``minigpt mcq --normalise none``), ``acc_norm`` divides
    by the choice's length in characters (``--normalise bytes`` on ASCII). The choice follows the question
    directly (no delimiter), as in ``minigpt mcq``."""
    path = Path(questions).resolve()
    return "\n".join([
        f"task: {name}",
        "dataset_path: json",
        "dataset_kwargs:",
        "  data_files:",
        f"    test: {path}",
        "test_split: test",
        "output_type: multiple_choice",
        "doc_to_text: question",
        "doc_to_choice: choices",
        "doc_to_target: answer",
        'target_delimiter: ""',
        "metric_list:",
        "  - metric: acc",
        "    aggregation: mean",
        "    higher_is_better: true",
        "  - metric: acc_norm",
        "    aggregation: mean",
        "    higher_is_better: true",
        "",
    ])


def write_cloze_task(questions: str | os.PathLike, task_dir: str | os.PathLike, name: str | None = None) -> Path:
    """Write ``task_dir/NAME.yaml`` (default name: ``minigpt_`` + the questions file's stem); returns its path."""
    from minigpt.io import atomic_file

    name = name or "minigpt_" + "".join(c if c.isalnum() else "_" for c in Path(questions).stem)
    out = Path(task_dir) / f"{name}.yaml"
    with atomic_file(out) as tmp:
        tmp.write_text(cloze_task_yaml(name, questions))
    return out
