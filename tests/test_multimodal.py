"""Image fine-tuning of Gemma 4 through mlx-vlm: data with image parts, assistant-only masks, training
that lowers the loss and changes the answer, exact resume, `generate --image`, `convert --multimodal`,
and an HF export that keeps the towers and matches MLX on an image+text input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from helpers import (
    REPEATED_RTOL,
    adapter_values,
    assert_logits_close,
    assert_one_line_error,
    assert_same_training,
    give_lora_b_values,
    run_cli,
)

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 50, 220), "yellow": (230, 220, 40)}
SETS = ["train.iters=12", "train.batch_size=4", "lora.rank=8", "train.lr=5e-3", "data.valid_fraction=0",
        "train.report_every=1", "train.save_every=4"]


def _sets(extra=()):
    return [a for s in [*SETS, *extra] for a in ("--set", s)]


def _dataset(path, kind: str, question: str, answers: list[str]):
    """A chat dataset: row i asks `question` about file {kind folder}/{i}.{ext} and is answered answers[i]."""
    folder, ext = {"image": ("img", "png"), "audio": ("wav", "wav")}[kind]
    rows = [{"messages": [{"role": "user", "content": [{"type": kind, kind: f"{folder}/{i}.{ext}"},
                                                       {"type": "text", "text": question}]},
                          {"role": "assistant", "content": answer}]} for i, answer in enumerate(answers)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def image_data(tmp_path_factory):
    """16 chat rows: a coloured picture (generated here) and the colour's name as the answer."""
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    (root / "img").mkdir()
    rng = np.random.default_rng(0)
    names = [list(COLOURS)[i % 4] for i in range(16)]
    for i, name in enumerate(names):
        noise = rng.integers(-20, 20, (24 + 8 * (i % 3), 40, 3))
        Image.fromarray(np.clip(np.array(COLOURS[name]) + noise, 0, 255).astype(np.uint8)).save(root / "img" / f"{i}.png")
    return _dataset(root / "colours.jsonl", "image", "Colour?", names)


@pytest.fixture(scope="module")
def image_run(hf_model, image_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("image-run") / "run"
    res = run_cli(["train", "--model", hf_model("gemma4_edge"), "--data", image_data, "-o", run, *_sets()])
    assert res.exit_code == 0, res.output
    return run


def _exported(out) -> dict:
    from safetensors.numpy import load_file

    weights = {}
    for f in out.glob("model-*.safetensors"):
        weights.update(load_file(f))
    return weights


def _mlx_and_transformers_logits(run, export_dir, image_data, i: int):
    """Logits of row i (its image and question) from our MLX model (mlx-vlm + the run's adapter) and
    from transformers on the exported checkpoint, fed the same tokens and the same picture."""
    import mlx.core as mx
    import torch
    from PIL import Image
    from transformers import Gemma4ForConditionalGeneration
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

    from mlx_gemma_tune import dataset_files, multimodal
    from mlx_gemma_tune.generate import ChatSession

    session = ChatSession.open(str(run), images=True)
    row = dataset_files.read_rows(image_data)[i]
    inputs, _, _, _, extra = multimodal.batch(multimodal.encode_row(session.processor, row)[0])
    ours = np.array(session.model(inputs, **extra).logits[0].astype(mx.float32))
    hf = Gemma4ForConditionalGeneration.from_pretrained(export_dir, dtype=torch.float32)
    pixels = Gemma4ImageProcessorPil(max_soft_tokens=70)(
        images=[Image.open(image_data.parent / "img" / f"{i}.png").convert("RGB")], return_tensors="pt")
    with torch.no_grad():
        theirs = hf(input_ids=torch.tensor(np.array(inputs)), pixel_values=pixels["pixel_values"],
                    image_position_ids=pixels["image_position_ids"],
                    mm_token_type_ids=torch.tensor(np.array(extra["mm_token_type_ids"]))).logits[0].numpy()
    return ours, theirs


def test_only_the_assistant_text_is_learned(hf_model, image_data):
    from mlx_gemma_tune import dataset_files, multimodal

    _model, processor = multimodal.load(hf_model("gemma4_edge"))
    row = dataset_files.read_rows(image_data)[0]
    [ex] = multimodal.encode_row(processor, row)
    tok = processor.tokenizer
    image_id = tok.convert_tokens_to_ids(processor.image_token)
    assert 40 < ex.tokens.count(image_id) <= 70  # up to the fixture's 70 soft tokens per image, in the user turn
    targets = [t for t, m in zip(ex.tokens, ex.mask) if m]
    assert tok.decode(targets) == "red<turn|>\n"  # the answer and its end of turn, as in text runs
    assert ex.extra["pixel_values"].shape[:2] == (1, 3)


@pytest.mark.parametrize("kind", ["image", "audio"])
def test_the_chunked_loss_equals_the_full_loss_on_image_and_audio_rows(kind, hf_model, image_data, tone_data):
    """Image / audio rows never hold the full logits: the chunked loss and its gradients equal the plain ones."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    from mlx_gemma_tune import dataset_files, hf_checkpoint, lora, losses, multimodal

    model, processor = multimodal.load(hf_model("gemma4_edge"), audio=kind == "audio")
    config = hf_checkpoint.read_config(hf_model("gemma4_edge"))
    mx.random.seed(0)
    lora.apply(model, config, lora.LoraSettings(rank=4, dropout=0.0))
    give_lora_b_values(model)
    data = image_data if kind == "image" else tone_data
    row = dataset_files.read_rows(data)[1]
    inputs, targets, mask, _, extra = multimodal.batch(multimodal.encode_row(processor, row)[0])
    results = []
    for chunk in (None, 4):
        fn = nn.value_and_grad(model, losses.masked_cross_entropy)
        (total, _count), grads = fn(model, inputs, targets, mask, None, chunk, None, True, extra)
        results.append((float(total), dict(tree_flatten(grads))))
    (full, g_full), (chunked, g_chunked) = results
    assert full > 1.0 and abs(full - chunked) < 1e-5 * full
    assert g_full.keys() == g_chunked.keys()
    scale = max(float(mx.abs(g).max()) for g in g_full.values())
    assert max(float(mx.abs(g_full[k] - g_chunked[k]).max()) for k in g_full) < 1e-5 * scale, scale


def test_data_check_reads_image_rows(image_data):
    from mlx_gemma_tune.data_check import check_dataset

    rep = check_dataset(image_data)
    assert rep.splits == {"train": 16} and rep.formats == {"chat": 16}
    assert rep.empty == 0  # a user turn holding an image and a question is not empty
    assert rep.duplicates == 0  # the same question about different images is not a duplicate


def test_image_training_lowers_the_loss_and_changes_the_answer(image_run, image_data):
    losses = [r["loss"] for r in map(json.loads, (image_run / "metrics.jsonl").read_text().splitlines())
              if r["type"] == "train"]
    assert len(losses) == 12 and losses[-1] < losses[0] / 3
    res = run_cli(["generate", image_run, "--image", image_data.parent / "img" / "2.png", "--prompt", "Colour?",
                   "--compare", "--temp", "0", "--max-tokens", "4", "--json"])
    assert res.exit_code == 0, res.output
    answer = json.loads(res.stdout)[0]
    assert answer["answer"] in COLOURS and answer["answer"] != answer["base"]


def test_chat_sends_the_image_with_the_first_message_and_saves_it_in_the_transcript(image_run, image_data, tmp_path):
    img = image_data.parent / "img" / "3.png"
    keys = f"Colour?\n/save {tmp_path / 't.jsonl'}\n/quit\n"
    res = run_cli(["chat", image_run, "--image", img, "--temp", "0", "--max-tokens", "3"], input=keys)
    assert res.exit_code == 0, res.output
    answer = res.stdout.split("model:", 1)[1].split("\n", 1)[0].strip()
    assert answer in COLOURS
    saved = json.loads((tmp_path / "t.jsonl").read_text().splitlines()[0])["messages"]
    assert saved[0]["content"][0] == {"type": "image", "image": str(img)}  # trainable again as an image row
    res = run_cli(["chat", image_run, "--image", tmp_path / "none.png"], input="Colour?\n/quit\n")
    assert "image not found" in res.output


def test_export_keeps_the_towers_and_matches_mlx_on_an_image(image_run, image_data, hf_model, tmp_path):
    from safetensors.numpy import load_file

    out = tmp_path / "hf"
    res = run_cli(["export", image_run, "--format", "hf", "-o", out, "--dtype", "float32"])
    assert res.exit_code == 0, res.output
    exported = _exported(out)
    source = load_file(hf_model("gemma4_edge") / "model.safetensors")
    towers = [k for k in source if k.startswith(("model.vision_tower.", "model.embed_vision.", "model.audio_tower."))]
    assert towers and all(np.array_equal(exported[k], source[k]) for k in towers)  # byte for byte
    ours, theirs = _mlx_and_transformers_logits(image_run, out, image_data, 2)
    assert np.abs(theirs).max() > 1.0
    assert_logits_close(ours, theirs, what="image + text")


def test_an_interrupted_image_run_resumes_exactly(hf_model, image_data, image_run, tmp_path):
    from mlx_gemma_tune import prepare, trainer

    class StopAt5(trainer.TrainCallback):
        def on_train_report(self, report):
            if report.step == 5:
                control.request_stop()

    control = trainer.Control()
    run = tmp_path / "run"
    prepared = prepare.prepare_run(model=str(hf_model("gemma4_edge")), data=str(image_data), out=str(run),
                                   sets=tuple(SETS))
    init = adapter_values(prepared.model)
    first = trainer.run(prepared, callback=StopAt5(), control=control)
    assert first.interrupted and first.steps == 5
    final = trainer.run(prepare.prepare_run(resume=str(run)))
    assert final.steps == 12
    assert all(k.startswith("language_model.model.layers.") for k in init)
    assert_same_training(run, image_run, init, REPEATED_RTOL)


def test_convert_multimodal_keeps_the_towers_for_training_and_chat(hf_model, image_data, tmp_path):
    from mlx_gemma_tune import multimodal

    out = tmp_path / "vision"
    res = run_cli(["convert", hf_model("gemma4_dense"), "-o", out, "--multimodal", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["multimodal"] is True
    assert multimodal.has_vision_weights(out)
    assert json.loads((out / "provenance.json").read_text())["source"]["path"] == str(hf_model("gemma4_dense"))
    run = tmp_path / "run"
    res = run_cli(["train", "--model", out, "--data", image_data, "-o", run, *_sets(["train.iters=2"])])
    assert res.exit_code == 0, res.output
    res = run_cli(["generate", run, "--image", image_data.parent / "img" / "0.png", "--prompt", "Colour?",
                   "--temp", "0", "--max-tokens", "3", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)[0]["answer"].strip()  # the converted multimodal model answered about the image


def test_image_refusals_are_one_clear_line(hf_model, image_data, tmp_path):
    res = run_cli(["train", "--model", hf_model("gemma3n"), "--data", image_data, "-o", tmp_path / "a", *_sets()])
    assert_one_line_error(res, "Gemma 3n", "mlx-vlm")
    res = run_cli(["train", "--model", hf_model("gemma3_text"), "--data", image_data, "-o", tmp_path / "b", *_sets()])
    assert_one_line_error(res, "no vision tower", "convert --multimodal")
    broken = tmp_path / "missing.jsonl"
    row = json.loads(image_data.read_text().splitlines()[0])
    row["messages"][0]["content"][0]["image"] = "img/nope.png"
    broken.write_text(json.dumps(row) + "\n")
    res = run_cli(["train", "--model", hf_model("gemma4_edge"), "--data", broken, "-o", tmp_path / "c", *_sets()])
    assert_one_line_error(res, "image not found", "nope.png", f"{broken}:1")
    res = run_cli(["convert", hf_model("gemma3_text"), "-o", tmp_path / "d", "--multimodal"])
    assert_one_line_error(res, "no vision tower")
    res = run_cli(["train", "--model", hf_model("gemma4_edge"), "--data", image_data, "-o", tmp_path / "e",
                   *_sets(["data.max_seq_length=20", "data.overlong=truncate"])])
    assert_one_line_error(res, "would cut an image", f"{image_data}:1")
    assert not any((tmp_path / n).exists() for n in "abcde")


def test_lora_on_the_vision_projector_is_merged_by_the_hf_export(hf_model, image_data, tmp_path):
    import mlx.core as mx
    from safetensors.numpy import load_file

    from mlx_gemma_tune import multimodal

    run = tmp_path / "run"
    res = run_cli(["train", "--model", hf_model("gemma4_dense"), "--data", image_data, "-o", run,
                   *_sets(["train.iters=4", "lora.vision_projector=true", "train.lr=2e-2"])])
    assert res.exit_code == 0, res.output
    assert "embed_vision.embedding_projection.lora_a" in mx.load(str(run / "adapters.safetensors"))
    assert run_cli(["generate", run, "--prompt", "Hi", "--max-tokens", "2"]).exit_code == 0  # text model: no projector
    assert_one_line_error(run_cli(["export", run, "--format", "peft", "-o", tmp_path / "peft"]), "vision projector")

    out = tmp_path / "hf"
    assert run_cli(["export", run, "--format", "hf", "-o", out, "--dtype", "float32"]).exit_code == 0
    exported = _exported(out)
    source = load_file(hf_model("gemma4_dense") / "model.safetensors")
    moved = np.abs(exported[multimodal.PROJECTOR_HF] - source[multimodal.PROJECTOR_HF]).max()
    assert moved > 1e-4  # the projector's LoRA is in the export
    tower = "model.vision_tower.encoder.layers.0.mlp.down_proj.linear.weight"
    assert np.array_equal(exported[tower], source[tower])
    ours, theirs = _mlx_and_transformers_logits(run, out, image_data, 1)
    assert_logits_close(ours, theirs, what="image + text, projector LoRA")


@pytest.fixture(scope="module")
def tone_data(tmp_path_factory):
    """8 chat rows: a sine tone (a WAV written here) and whether it is low or high."""
    import wave

    root = tmp_path_factory.mktemp("tones")
    (root / "wav").mkdir()
    names = ["low" if i % 2 == 0 else "high" for i in range(8)]
    for i, name in enumerate(names):
        t = np.arange(int((0.4 + 0.1 * (i % 3)) * 16000)) / 16000
        with wave.open(str(root / "wav" / f"{i}.wav"), "wb") as w:
            w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
            hz = 220 if name == "low" else 1760
            w.writeframes((0.3 * np.sin(2 * np.pi * hz * t) * 32767).astype("<i2").tobytes())
    return _dataset(root / "tones.jsonl", "audio", "Pitch?", names)


def test_audio_fine_tuning_of_gemma4_edge(hf_model, tone_data, tmp_path):
    import mlx.core as mx
    import torch
    from safetensors.numpy import load_file
    from transformers import Gemma4ForConditionalGeneration

    from mlx_gemma_tune import dataset_files, multimodal
    from mlx_gemma_tune.generate import ChatSession

    run = tmp_path / "run"
    res = run_cli(["train", "--model", hf_model("gemma4_edge"), "--data", tone_data, "-o", run,
                   *_sets(["train.iters=8"])])
    assert res.exit_code == 0, res.output
    losses = [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
              if r["type"] == "train"]
    assert losses[-1] < losses[0] / 3
    trained = mx.load(str(run / "adapters.safetensors"))
    assert all(k.startswith("language_model.") for k in trained)  # the audio tower stayed frozen
    res = run_cli(["generate", run, "--audio", tone_data.parent / "wav" / "1.wav", "--prompt", "Pitch?",
                   "--compare", "--temp", "0", "--max-tokens", "3", "--json"])
    assert res.exit_code == 0, res.output
    answer = json.loads(res.stdout)[0]
    assert answer["answer"] in ("low", "high") and answer["answer"] != answer["base"]

    out = tmp_path / "hf"
    assert run_cli(["export", run, "--format", "hf", "-o", out, "--dtype", "float32"]).exit_code == 0
    exported, source = _exported(out), load_file(hf_model("gemma4_edge") / "model.safetensors")
    towers = [k for k in source if k.startswith(("model.audio_tower.", "model.embed_audio."))]
    assert towers and all(np.array_equal(exported[k], source[k]) for k in towers)
    session = ChatSession.open(str(run), audio=True)
    row = dataset_files.read_rows(tone_data)[1]
    inputs, _, _, _, extra = multimodal.batch(multimodal.encode_row(session.processor, row)[0])
    ours = np.array(session.model(inputs, **extra).logits[0].astype(mx.float32))
    hf = Gemma4ForConditionalGeneration.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():  # the same log-mel features (mlx-vlm's extractor) into transformers' model
        theirs = hf(input_ids=torch.tensor(np.array(inputs)),
                    input_features=torch.tensor(np.array(extra["input_features"])),
                    input_features_mask=torch.tensor(np.array(extra["input_features_mask"])),
                    mm_token_type_ids=torch.tensor(np.array(extra["mm_token_type_ids"]))).logits[0].numpy()
    assert_logits_close(ours, theirs, what="audio + text")

    res = run_cli(["train", "--model", hf_model("gemma4_dense"), "--data", tone_data, "-o", tmp_path / "x", *_sets()])
    assert_one_line_error(res, "no audio tower", "E2B")
