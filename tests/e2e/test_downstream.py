"""apollo-ds eval / generate on a real trained checkpoint and on its Hugging Face export:
the native model (apollo_ds's PoolGPT from the layout-free params/) and the export give the
same held-out loss and the same greedy continuation; the loss equals a cross entropy computed here from HF's logits on
the same windows; sampling is repeatable and top-k 1 is greedy;
bad input is refused with exit code 2 and one line."""
from __future__ import annotations

import json
import math

import pytest
import torch

from tests.conftest import pretrain_and_export, real_text_lines

PROMPTS = ["The king said", "And then"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus):
    tmp = tmp_path_factory.mktemp("downstream")
    run, hf = pretrain_and_export(tmp, corpus)
    held_out = tmp / "held_out.txt"
    held_out.write_text("\n".join(real_text_lines(3000)[-40:]) + "\n")
    return {"run": run, "hf": hf, "text": held_out, "corpus": corpus}


@pytest.fixture
def cli(capsys, single_process_group):
    """``apollo-ds`` in this process (one interpreter start instead of one per call)."""
    from apollo_ds.cli import main

    def call(*args) -> dict | str:
        capsys.readouterr()
        rc = main(list(args))
        out = capsys.readouterr()
        assert rc == 0, out.err[-3000:]
        return json.loads(out.out) if "--json" in args else out.out
    return call


def test_eval_native_equals_export_and_hf_own_loss(trained, cli):
    native = cli("eval", "--checkpoint", str(trained["run"]), "--text", str(trained["text"]),
                 "--json")
    hf = cli("eval", "--checkpoint", str(trained["hf"]), "--text", str(trained["text"]),
             "--json")
    assert (native["kind"], hf["kind"]) == ("native", "hf")
    assert native["tokens"] == hf["tokens"] > 1000
    assert hf["loss"] == pytest.approx(native["loss"], rel=1e-5)
    assert native["perplexity"] == pytest.approx(math.exp(native["loss"]), rel=1e-12)
    # independent: HF's own shifted cross entropy on the same windows of the same stream
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(trained["hf"], local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(trained["hf"], local_files_only=True)
    stream = []
    for line in trained["text"].read_text().splitlines():
        stream += tok.encode(line, add_special_tokens=False) + [tok.eos_token_id]
    s = model.config.n_positions
    n = (len(stream) - 1) // s
    w = torch.tensor(stream[: n * s + 1])
    losses = []
    with torch.no_grad():
        for i in range(n):
            ids = w[i * s: (i + 1) * s + 1]
            logits = model(ids[None, :-1]).logits[0]
            losses.append(torch.nn.functional.cross_entropy(logits, ids[1:]).item())
    assert n * s == native["tokens"]
    assert native["loss"] == pytest.approx(sum(losses) / n, rel=1e-5)
    # the indexed dataset's validation split, as training splits it
    data = cli("eval", "--checkpoint", str(trained["run"]), "--data", trained["corpus"].prefix,
               "--max-windows", "4", "--json")
    assert data["windows"] == 4 and 3.0 < data["loss"] < 7.0


def test_generate_greedy_is_the_same_from_both_and_sampling_is_repeatable(trained, cli):
    args = ["--max-new-tokens", "12", "--json"]
    native = cli("generate", "--checkpoint", str(trained["run"]),
                 *sum([["--prompt", p] for p in PROMPTS], []), *args)
    hf = cli("generate", "--checkpoint", str(trained["hf"]),
             *sum([["--prompt", p] for p in PROMPTS], []), *args)
    assert [r["ids"] for r in native] == [r["ids"] for r in hf]
    assert all(len(r["ids"]) > 0 for r in native)
    sampled = ["--temperature", "1.0", "--top-p", "0.9", "--seed", "5"]
    a = cli("generate", "--checkpoint", str(trained["run"]), "--prompt", PROMPTS[0],
            *sampled, *args)
    b = cli("generate", "--checkpoint", str(trained["run"]), "--prompt", PROMPTS[0],
            *sampled, *args)
    assert a == b
    top1 = cli("generate", "--checkpoint", str(trained["run"]), "--prompt", PROMPTS[0],
               "--temperature", "1.0", "--top-k", "1", *args)
    assert top1[0]["ids"] == native[0]["ids"]
    text = cli("generate", "--checkpoint", str(trained["hf"]), "--prompt", PROMPTS[0])
    assert text.startswith(PROMPTS[0]) and len(text.strip()) > len(PROMPTS[0])


def test_next_token_filters():
    from apollo_ds.downstream.generate import next_token
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    g = torch.Generator().manual_seed(0)
    assert next_token(logits, 0.0, 0, 1.0, g) == 0
    # top-p 0.7: keeps {0, 1} (0.5 < 0.7 <= 0.8); top-k 3 never draws index 3
    draws = {next_token(logits, 1.0, 0, 0.7, g) for _ in range(200)}
    assert draws == {0, 1}
    assert 3 not in {next_token(logits, 1.0, 3, 1.0, g) for _ in range(300)}


def test_repetition_penalty_is_hugging_faces():
    # against transformers' own RepetitionPenaltyLogitsProcessor (an independent implementation)
    from transformers import RepetitionPenaltyLogitsProcessor
    from apollo_ds.downstream.generate import penalize_repeats
    logits = torch.randn(50, generator=torch.Generator().manual_seed(3))
    ctx = [4, 7, 7, 19, 33, 4, 2]
    ref = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([ctx]), logits[None].clone())[0]
    got = penalize_repeats(logits, ctx, 1.3)
    assert torch.allclose(got, ref)
    assert not torch.equal(got, logits) and torch.equal(got[0], logits[0])
    assert torch.equal(penalize_repeats(logits, ctx, 1.0), logits)


@pytest.mark.parametrize("args,message", [
    (["eval", "--checkpoint", "/nonexistent", "--text", "x.txt"], "no such directory"),
    (["eval", "--checkpoint", "."], "give held-out text as --data PREFIX"),
    (["eval", "--checkpoint", "RUN", "--text", "/nonexistent.txt"], "--text /nonexistent.txt"),
    (["generate", "--checkpoint", "/nonexistent", "--prompt", "x"], "no such directory"),
    (["generate", "--checkpoint", "RUN", "--prompt", "x", "--repetition-penalty", "0"],
     "--repetition-penalty 0.0: must be > 0"),
])
def test_bad_input_is_refused(trained, args, message, capsys, single_process_group):
    from apollo_ds.cli import main
    args = [str(trained["run"]) if a == "RUN" else a for a in args]
    capsys.readouterr()
    assert main(args) == 2
    err = [line for line in capsys.readouterr().err.splitlines()
           if line.startswith("apollo-ds ")]
    assert len(err) == 1 and message in err[0], err


# ------------------------------------------------------------------ strict loading, placement
def _one_error(capsys, prefix: str) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith(prefix)]
    assert len(err) == 1, err
    return err[0]


def _cut_rows(tag_dir, name: str, index_too: bool) -> tuple[list, list]:
    """Record the first half of a parameter's rows as its stored slices' shape in index.json,
    optionally as its full shape too, and re-record the manifest, so only the shape checks
    can notice. (full, cut) shapes."""
    from apollo_ds import rundir
    path = tag_dir / rundir.PARAMS / rundir.INDEX
    index = json.loads(path.read_text())
    full = index["params"][name]["shape"]
    cut = [full[0] // 2] + full[1:]
    for row in index["fragments"][name]:
        row[4] = cut                     # the local (TP=1) shape of the stored slices
    if index_too:
        index["params"][name]["shape"] = cut
    path.write_text(json.dumps(index))
    manifest = json.loads((tag_dir / rundir.MANIFEST).read_text())
    manifest["files"][str(path.relative_to(tag_dir))] = {"size": path.stat().st_size,
                                                          "sha256": rundir.sha256(str(path))}
    (tag_dir / rundir.MANIFEST).write_text(json.dumps(manifest))
    return full, cut


def test_a_cut_tensor_is_refused_naming_parameter_file_and_shapes(trained, tmp_path, capsys,
                                                                  single_process_group):
    import shutil

    from apollo_ds import rundir
    from apollo_ds.cli import main
    from apollo_ds.convert.to_hf import main as export
    run = tmp_path / "run"
    shutil.copytree(trained["run"], run)
    ck = run / rundir.CHECKPOINTS
    tag_dir = ck / rundir.read_latest(str(ck))
    name = "pool.0.fc1.weight"
    path = tag_dir / rundir.PARAMS / rundir.INDEX
    full, cut = _cut_rows(tag_dir, name, index_too=False)
    want = (f"parameter {name}: {path}: stored slices of shape {cut} x 1 do not fit the "
            f"recorded shape {full}; the checkpoint is corrupt: use an older tag")
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(run), "--text", str(trained["text"])]) == 2
    assert _one_error(capsys, "apollo-ds ") == f"apollo-ds eval: error: {want}"
    assert main(["generate", "--checkpoint", str(run), "--prompt", "x"]) == 2
    assert _one_error(capsys, "apollo-ds ") == f"apollo-ds generate: error: {want}"
    assert export(["--checkpoint", str(run), "--output", str(tmp_path / "hf")]) == 2
    assert _one_error(capsys, "to_hf: ") == f"to_hf: error: {want}"
    assert not (tmp_path / "hf").exists()
    # cut in index.json as well: the model's own shape refuses it (no zero-padding of fc1)
    _, cut = _cut_rows(tag_dir, name, index_too=True)
    files = {row[0] for row in json.loads(path.read_text())["fragments"][name]}
    path = tag_dir / rundir.PARAMS / (files.pop() if len(files) == 1 else "rank_*.bin")
    assert main(["eval", "--checkpoint", str(run), "--text", str(trained["text"])]) == 2
    assert _one_error(capsys, "apollo-ds ") == (
        f"apollo-ds eval: error: parameter {name}: {path} gives shape {cut} (recorded {cut}) "
        f"but the model's is {full}; the checkpoint was written by another model")


def test_exports_stay_out_of_run_dirs_and_eval_picks_the_run(trained, tmp_path, capsys, cli):
    import shutil

    from apollo_ds.convert.to_hf import main as export
    run = tmp_path / "run"
    shutil.copytree(trained["run"], run)
    for out in (run, run / "hf", run / "checkpoints" / "hf"):
        capsys.readouterr()
        assert export(["--checkpoint", str(trained["run"]), "--output", str(out)]) == 2
        inside = run / "checkpoints" if out.parent.name == "checkpoints" else run
        assert _one_error(capsys, "to_hf: ") == (
            f"to_hf: error: --output {out} lies inside the run directory {inside}; write the "
            f"export outside it (e.g. {inside}_hf)")
    assert not (run / "config.json").exists() and not (run / "hf").exists()
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("keep me")
    assert export(["--checkpoint", str(trained["run"]), "--output", str(notes)]) == 2
    assert _one_error(capsys, "to_hf: ") == (
        f"to_hf: error: --output {notes} is a non-empty directory that is not an earlier "
        f"export; give a new or empty directory")
    assert sorted(p.name for p in notes.iterdir()) == ["todo.txt"]
    again = tmp_path / "again"
    shutil.copytree(trained["hf"], again)              # an earlier export may be replaced
    assert export(["--checkpoint", str(trained["run"]), "--output", str(again)]) == 0
    # an export lying in a run directory (as older versions allowed) never shadows the run
    for f in trained["hf"].iterdir():
        shutil.copy(f, run / f.name)
    args = ["--text", str(trained["text"]), "--json"]
    native = cli("eval", "--checkpoint", str(trained["run"]), *args)
    picked = cli("eval", "--checkpoint", str(run), *args)
    assert picked["kind"] == "native" and picked["model"].startswith(str(run / "checkpoints"))
    assert picked["loss"] == native["loss"]
    assert cli("eval", "--checkpoint", str(again), *args)["kind"] == "hf"
