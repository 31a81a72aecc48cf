"""The data a run trains on, through the commands a user runs: its tokens and epochs stated at
start-up, a run that would repeat it too often refused (exit 2, no traceback, nothing
written), JSONL tokens keyed by the files' content, prepare_data's .bin/.idx."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from nemo_upcycle.data.epochs import MAX_EPOCHS, DataBudget, train_fraction
from tests.conftest import write_news_jsonl


def test_epochs_of_a_blend():
    """Weighted datasets are read by their weight; the refusal's step bound stays within the threshold."""
    budget = DataBudget(prefixes=["a", "b"], tokens=[1000, 3000], shares=[0.5, 0.5], train_fraction=1.0,
                        max_steps=10, global_batch_size=4, seq_length=100)
    assert budget.trained_tokens == 4000
    assert budget.epochs() == pytest.approx([2.0, 2000 / 3000])
    assert budget.steps_within(MAX_EPOCHS) == 20  # a: 0.5 x 20 x 400 / 1000 = 4 epochs
    assert train_fraction("98,2,0") == pytest.approx(0.98) and train_fraction("0.9,0.1,0") == pytest.approx(0.9)


def _expected_tokens(tokenizer, texts):
    """Each document's ids as transformers gives them, plus the end-of-document token."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer))
    return [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts]


def _read_back(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(str(prefix))
    return [dataset.get(i).tolist() for i in range(len(dataset))]


def _stated_tokens(stdout: str) -> int:
    line = next(line for line in stdout.splitlines() if line.startswith("data: "))
    return int(line.split("data: ")[1].split(" tokens")[0].replace(",", ""))


def _train_all(runs: dict, tmp_path: Path) -> dict:
    """Start every ``name: overrides`` training command at once (each stops in its first
    seconds); return name -> (completed process, its working directory)."""
    procs = {}
    for name, overrides in runs.items():
        cwd = tmp_path / f"cwd_{name}"
        cwd.mkdir()
        procs[name] = (cwd, subprocess.Popen(
            [sys.executable, "-m", "nemo_upcycle.train", *overrides, f"log_dir={tmp_path / name / 'run'}"],
            cwd=cwd, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=dict(os.environ, OMP_NUM_THREADS="1"), start_new_session=True))
    done = {}
    try:
        for name, (cwd, proc) in procs.items():
            stdout, stderr = proc.communicate(timeout=300)
            done[name] = (subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), cwd)
    finally:  # a timeout leaves none of them running
        for _, proc in procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return done


def _refused(name, out, cwd, tmp_path, needle):
    assert out.returncode == 2, f"{name}: exit {out.returncode}\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    assert needle in out.stderr, f"{name}: {out.stderr[-3000:]}"
    assert "Traceback" not in out.stdout + out.stderr, f"{name}: {out.stderr[-3000:]}"
    assert not (tmp_path / name).exists(), f"{name} created its log_dir"
    assert not list(cwd.iterdir()), f"{name} wrote {list(cwd.iterdir())} in its working directory"


def test_data_is_stated_and_refused_through_train(tiny_smollm_vocab, cache_dir, tmp_path):
    """One round of refused ``train`` runs at once: the paper's recipe on the embedded sample,
    a JSONL corpus too small for the run (rewritten under the same name after an earlier job
    tokenized it: the run must read the new text), a glob that matches nothing, a misspelt field."""
    from nemo_upcycle.config.compose import compose_config
    from nemo_upcycle.data.indexed import dataset_tokens
    from nemo_upcycle.data.prepare import resolve_data_paths

    path, tokenizer = tiny_smollm_vocab
    tiny = ["model=tiny_llama", "model.vocab_size=49152", f"model.dense_checkpoint={path}",
            f"model.tokenizer={tokenizer}", f"cache_dir={cache_dir}"]
    corpus = tmp_path / "corpus" / "train.jsonl"
    corpus.parent.mkdir()
    jsonl = [f"data.jsonl={corpus}", "data.text_field=body", "trainer.max_steps=100000"]
    first = write_news_jsonl(corpus, slice(0, 150))
    (earlier,) = resolve_data_paths(compose_config([*tiny, *jsonl]), Path(tokenizer))  # an earlier job's tokens
    assert dataset_tokens(earlier) == sum(map(len, _expected_tokens(tokenizer, first)))
    rewritten = write_news_jsonl(corpus, slice(150, None))  # same name, other articles
    done = _train_all({
        # max_position_embeddings: the paper's 8192-token sequences must pass validation to reach the data.
        "paper": [*tiny, "trainer=paper", "model.max_position_embeddings=8192"],
        "jsonl": [*tiny, *jsonl],
        "no_match": [*tiny, f"data.jsonl={tmp_path / 'nowhere'}/*.jsonl"],
        "field": [*tiny, f"data.jsonl={corpus}", "data.text_field=text"],
    }, tmp_path)

    out, cwd = done["paper"]
    _refused("paper", out, cwd, tmp_path, "this run would read its data")
    for needle in ("trainer.max_steps=24000 x global_batch_size=512 x seq_length=8192 = 100,663,296,000 tokens",
                   "data.paths=embedded:gensim_wiki", f"needs at least {int(100_663_296_000 / MAX_EPOCHS / 0.98):,} "
                   "tokens", "nemo-upcycle prepare_data", "data.allow_repeats=true"):
        assert needle in out.stderr, (needle, out.stderr[-2000:])
    assert f"holds {_stated_tokens(out.stdout):,} tokens" in out.stderr

    out, cwd = done["jsonl"]
    _refused("jsonl", out, cwd, tmp_path, "this run would read its data")
    assert _stated_tokens(out.stdout) == sum(map(len, _expected_tokens(tokenizer, rewritten))) != dataset_tokens(earlier)
    _refused("no_match", *done["no_match"], tmp_path, f"data.jsonl: no file at {tmp_path / 'nowhere'}/*.jsonl")
    _refused("field", *done["field"], tmp_path, f"{corpus}, line 1: no field 'text' (fields: id, body)")


def test_prepare_data_writes_what_transformers_tokenizes(prepared_news, tmp_path):
    """prepare_data (2 worker processes) wrote each article's transformers ids and an EOD, in
    order; it refuses to overwrite them and names a missing field before writing anything."""
    expected = _expected_tokens(prepared_news["tokenizer"], prepared_news["texts"])
    assert _read_back(prepared_news["prefix"]) == expected
    assert f"{sum(map(len, expected)):,} tokens" in prepared_news["stdout"]
    assert f"data.paths={prepared_news['prefix']}" in prepared_news["stdout"]
    again = subprocess.run([sys.executable, "-m", "nemo_upcycle.prepare_data", f"data.jsonl={prepared_news['jsonl']}",
                            "data.text_field=body", f"data.output_prefix={prepared_news['prefix'].parent / 'news'}",
                            f"model.tokenizer={prepared_news['tokenizer']}"],
                           capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert again.returncode == 2 and "already exist" in again.stderr and "Traceback" not in again.stderr, again.stderr
