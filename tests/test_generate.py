"""generate.py on tiny models built here: cached decoding equals full recompute (utils/decoding.py), the CLI, bad
input (utils/load_model.py), --eval."""
import io
import json
import os
import time

import pytest
import torch
from transformers.generation.logits_process import (LogitsProcessorList, NoRepeatNGramLogitsProcessor,
                                                    RepetitionPenaltyLogitsProcessor)

import generate
from utils.decoding import CoeusLM, Decoder, LlamaLM, Row, decode_tokens, full_recompute_greedy
from utils.load_model import load_model
from models.coeus import Coeus, coeus_config
from models.llama import Llama, llama_config
from models.llava import LlavaConfig, LlavaModel
from models.vit import vision_config
from utils.checkpoint import save_atomic
from utils.lm_metrics import degeneration_metrics, distinct_n, perplexity, rep_l, seq_rep_n
from utils.sampling import SamplerConfig
from utils.tokenizer import CharTokenizer

TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
        "First Citizen:\nYou are all resolved rather to die than to famish?\n") * 3
TOK = CharTokenizer.train(TEXT)


def tiny_llama(vocab=TOK.vocab_size, **kw):
    torch.manual_seed(0)
    return Llama(llama_config("tiny", vocab_size=vocab, max_seq_len=64, **kw)).eval()


def tiny_coeus(vocab=TOK.vocab_size):
    torch.manual_seed(0)
    return Coeus(coeus_config("tiny", vocab_size=vocab)).eval()


def save(tmp_path, kind, model, tok=TOK, name=None, model_config=None):
    from dataclasses import asdict
    path = tmp_path / (name or f"{kind}.pt")
    save_atomic(dict(kind=kind, model_config=model_config or asdict(model.config), model=model.state_dict(),
                     tokenizer=tok.to_dict()), path)
    return str(path)


def greedy_by_decoder(lm, prompts, n, sampler=None):
    dec = Decoder(lm, sampler or SamplerConfig(temperature=0))
    dec.setup(prompts.shape[0], prompts.shape[1] + n, "cpu")
    return torch.cat(list(decode_tokens(dec, dec.decode_one, prompts, n, sync_every=5)), 1)


@pytest.mark.parametrize("make, wrap", [(tiny_llama, LlamaLM), (tiny_coeus, CoeusLM)])
def test_cached_greedy_equals_full_recompute(make, wrap):
    """KV cache / recurrent state decoding gives the tokens of rerunning the whole sequence each step."""
    lm = wrap(make())
    prompts = torch.randint(0, TOK.vocab_size, (2, 11), generator=torch.Generator().manual_seed(1))
    n = 26  # past Coeus' tiny window (8) and chunk (16): ring buffer and state carry are exercised
    with torch.no_grad():
        ours = greedy_by_decoder(lm, prompts, n)
        ref = full_recompute_greedy(lm, prompts, n)
    assert torch.equal(ours, ref)


def test_greedy_with_penalties_equals_hf_processors_on_full_recompute():
    lm = LlamaLM(tiny_llama())
    prompts = torch.randint(0, TOK.vocab_size, (3, 9), generator=torch.Generator().manual_seed(2))
    cfg = SamplerConfig(temperature=0, repetition_penalty=1.5, no_repeat_ngram_size=3)
    procs = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.5), NoRepeatNGramLogitsProcessor(3)])
    with torch.no_grad():
        ours = greedy_by_decoder(lm, prompts, 30, cfg)
        ids = prompts
        for _ in range(30):
            scores = procs(ids, lm.full_logits(ids)[:, -1].float())
            ids = torch.cat([ids, scores.argmax(-1, keepdim=True)], 1)
    assert torch.equal(ours, ids[:, 9:])


def test_decode_step_traces_as_one_graph():
    """fullgraph=True: no graph break in decode_one (what CUDA graphs need); same tokens as eager."""
    lm = LlamaLM(tiny_llama())
    cfg = SamplerConfig(temperature=0, repetition_penalty=1.2, repetition_window=4, no_repeat_ngram_size=2,
                        frequency_penalty=0.1)
    prompts = torch.randint(0, TOK.vocab_size, (2, 5), generator=torch.Generator().manual_seed(3))
    dec = Decoder(lm, cfg)
    dec.setup(2, 32, "cpu")
    torch._dynamo.reset()
    step = torch.compile(dec.decode_one, backend="eager", fullgraph=True)
    with torch.no_grad():
        traced = torch.cat(list(decode_tokens(dec, step, prompts, 12, sync_every=0)), 1)
    assert torch.equal(traced, greedy_by_decoder(lm, prompts, 12, cfg))


def test_compiled_prefill_follows_prompt_lengths_and_a_failed_compile_falls_back():
    """make_step compiles the prefill on CUDA with dynamic shapes: prompts of other lengths give the eager logits;
    a function the compiler refuses runs eagerly, with a warning, from then on."""
    from utils.runtime import CompiledOrEager
    lm = LlamaLM(tiny_llama())
    lm.setup(1, 32)
    torch._dynamo.reset()
    prefill = CompiledOrEager(lm.prefill, "the prefill", backend="eager", dynamic=True)
    with torch.no_grad():
        for T in (5, 9, 17):
            ids = torch.randint(0, TOK.vocab_size, (1, T), generator=torch.Generator().manual_seed(T))
            assert torch.allclose(prefill(ids, None), lm.prefill(ids), atol=1e-6)
    assert prefill.is_compiled()

    def data_dependent(x):
        return x + 1 if x.sum().item() > 0 else x - 1  # a graph break: fullgraph=True refuses it
    f = CompiledOrEager(data_dependent, "f", backend="eager", fullgraph=True)
    with pytest.warns(UserWarning, match="torch.compile of f failed"):
        assert torch.equal(f(torch.ones(3)), torch.full((3,), 2.0))
    assert not f.is_compiled() and torch.equal(f(-torch.ones(3)), torch.full((3,), -2.0))


def test_sampling_is_seeded_and_samples_differ(tmp_path):
    lm = LlamaLM(tiny_llama())
    dec = Decoder(lm, SamplerConfig(temperature=1.5, top_k=0, top_p=1.0))
    prompts = torch.zeros(4, 3, dtype=torch.long)
    dec.setup(4, 40, "cpu")
    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        with torch.no_grad():
            runs.append(torch.cat(list(decode_tokens(dec, dec.decode_one, prompts, 30)), 1))
    assert torch.equal(runs[0], runs[1])
    assert len({tuple(r) for r in runs[0].tolist()}) > 1, "the batch rows should be different samples"


def test_cli_streams_and_batches(tmp_path, capsys):
    ck = save(tmp_path, "llama", tiny_llama())
    res = generate.main(["--ckpt", ck, "--prompt", "All:", "--max-new-tokens", "20", "--sync-every", "3"])
    assert capsys.readouterr().out == "All:" + res[0]["texts"][0] + "\n"
    assert len(res[0]["token_ids"][0]) == 20
    res = generate.main(["--ckpt", ck, "--prompt", "All:", "--max-new-tokens", "10", "--num-samples", "3",
                         "--quiet"])
    assert capsys.readouterr().out.count("--- sample") == 3
    assert res[0]["new_tokens"] == 30


def test_cli_reports_its_start_up(tmp_path, capsys):
    # the time to the first tokens, from the start (here: main's; the script counts its imports too), in parts
    ck = save(tmp_path, "llama", tiny_llama())
    res = generate.main(["--ckpt", ck, "--prompt", "All:", "--max-new-tokens", "8", "--sync-every", "4"])
    s = res[0]["startup_s"]
    assert s["imports"] == 0 and min(s["loading"], s["kernel_tuning"], s["first_call"]) >= 0
    assert s["first_tokens"] == pytest.approx(s["loading"] + s["kernel_tuning"] + s["first_call"], abs=0.05)
    assert "[start-up: first tokens" in capsys.readouterr().err
    t = time.perf_counter()
    res = generate.main(["--ckpt", ck, "--prompt", "All:", "--max-new-tokens", "8", "--quiet"], t_start=t - 2.0)
    assert res[0]["startup_s"]["imports"] >= 2.0 and "start-up" not in capsys.readouterr().err


def test_cpu_generate_never_imports_the_compiler(tmp_path):
    """On the CPU generate.py decodes eagerly, so nothing of its path may import torch._dynamo (1.4 s of a 2-core
    start each: a custom op's first call, the meta-device init of an HF folder's model did). A fresh process reads
    an HF folder, a Llama and a Coeus checkpoint and samples from each."""
    import subprocess
    import sys

    from tokenizers import Tokenizer, models, pre_tokenizers

    from models.hf_weights import export_pretrained
    folder = tmp_path / "hf"
    export_pretrained(tiny_llama(vocab=512), str(folder))
    words = Tokenizer(models.WordLevel({"<unk>": 0, **{f"w{i}": i for i in range(1, 512)}}, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    words.save(str(folder / "tokenizer.json"))
    ck, coeus = save(tmp_path, "llama", tiny_llama()), save(tmp_path, "coeus", tiny_coeus(), name="coeus.pt")
    code = ("import sys, generate\n"
            f"generate.main(['--ckpt', {coeus!r}, '--prompt', 'All:', '--max-new-tokens', '4', '--quiet'])\n"
            f"generate.main(['--ckpt', {str(folder)!r}, '--prompt', 'w1 w2', '--max-new-tokens', '4', '--quiet'])\n"
            f"generate.main(['--ckpt', {ck!r}, '--prompt', 'All:', '--max-new-tokens', '4', '--quiet'])\n"
            "print('dynamo imported:', 'torch._dynamo' in sys.modules)")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "dynamo imported: False" in out.stdout


def test_cli_coeus_greedy_matches_reference(tmp_path, capsys):
    model = tiny_coeus()
    ck = save(tmp_path, "coeus", model)
    res = generate.main(["--ckpt", ck, "--prompt", "Speak", "--max-new-tokens", "25", "--greedy", "--quiet"])
    ids = torch.tensor([TOK.encode("Speak")])
    with torch.no_grad():
        ref = full_recompute_greedy(CoeusLM(model), ids, 25)
    assert res[0]["token_ids"][0] == ref[0].tolist()


def test_stop_string_and_eos():
    tok = CharTokenizer.train("abcdef")
    row = Row(tok, [0], eos=tok.stoi["d"], stop=())
    row.add([1, 2, 3, 4])
    assert row.done and row.ids == [1, 2] and row.text() == "bc"
    row = Row(tok, [0], eos=None, stop=["cd"])
    row.add([1, 2])
    assert not row.done and row.stream_text() == "b"  # "c" held back: it may start "cd"
    row.add([3, 4])
    assert row.done and row.text() == "b"


def test_cli_stop_string(tmp_path, capsys):
    ck = save(tmp_path, "llama", tiny_llama())
    full = generate.main(["--ckpt", ck, "--prompt", "All", "--max-new-tokens", "30", "--greedy", "--quiet"])
    text = full[0]["texts"][0]
    stop = text[10:12]
    capsys.readouterr()
    cut = generate.main(["--ckpt", ck, "--prompt", "All", "--max-new-tokens", "30", "--greedy", "--quiet",
                         "--stop", stop, "--sync-every", "4"])
    assert cut[0]["texts"][0] == text[:text.find(stop)]
    assert capsys.readouterr().out == "All" + text[:text.find(stop)] + "\n"


def test_interactive_reads_stdin(tmp_path, monkeypatch, capsys):
    ck = save(tmp_path, "llama", tiny_llama())
    monkeypatch.setattr("sys.stdin", io.StringIO("All:\n\nSpeak €\nSpeak\n"))
    res = generate.main(["--ckpt", ck, "--interactive", "--max-new-tokens", "5", "--quiet"])
    assert len(res) == 2
    assert "cannot encode the prompt" in capsys.readouterr().err


def test_prompt_file(tmp_path, capsys):
    ck = save(tmp_path, "llama", tiny_llama())
    pf = tmp_path / "p.txt"
    pf.write_text("First Citizen:\n")
    generate.main(["--ckpt", ck, "--prompt-file", str(pf), "--max-new-tokens", "5", "--quiet"])
    assert capsys.readouterr().out.startswith("First Citizen:\n")


# --- bad input: one clear line each ----------------------------------------------------------------------

def test_prompt_longer_than_context(tmp_path, capsys):
    ck = save(tmp_path, "llama", tiny_llama())  # context 64
    long = "Speak, speak. " * 5                  # 70 tokens
    with pytest.raises(SystemExit, match="over the model's context of 64 tokens"):
        generate.main(["--ckpt", ck, "--prompt", long, "--max-new-tokens", "10"])
    res = generate.main(["--ckpt", ck, "--prompt", long, "--max-new-tokens", "10", "--truncate-left", "--quiet"])
    assert res[0]["new_tokens"] == 10


def test_prompt_outside_the_vocabulary(tmp_path):
    ck = save(tmp_path, "llama", tiny_llama())
    with pytest.raises(SystemExit, match="cannot encode the prompt: character '€'"):
        generate.main(["--ckpt", ck, "--prompt", "Speak €"])


def test_unknown_kind(tmp_path):
    ck = save(tmp_path, "diffusion", tiny_llama())
    with pytest.raises(SystemExit, match="kind 'diffusion'"):
        generate.main(["--ckpt", ck])


def test_tokenizer_vocab_mismatch(tmp_path):
    big = CharTokenizer.train(TEXT + "0123456789QWXZ@#$%^&*()[]{}<>~`|+=_")
    ck = save(tmp_path, "llama", tiny_llama(), tok=big)
    with pytest.raises(SystemExit, match=f"tokenizer has {big.vocab_size} tokens but the model's vocabulary is "
                                         f"{TOK.vocab_size}"):
        generate.main(["--ckpt", ck])


def test_loading_only_loads_and_the_decoder_fuses(tmp_path):
    """load_model keeps the checkpoint's parameters (a training script may start from them); inference_lm, when the
    decoder is built, fuses the projections in place (and on CUDA would put the kernels in and tune them)."""
    from utils.decoding import inference_lm
    model = tiny_llama()
    loaded = load_model(save(tmp_path, "llama", model))
    assert list(loaded.lm.model.state_dict()) == list(model.state_dict())
    lm = inference_lm(loaded.lm, "cpu")
    assert lm.model is loaded.lm.model and lm.model.layers[0].self_attn.qkv_proj is not None
    assert lm.gemv_report is None and lm.arrivals is None  # no kernels off CUDA


def test_loading_skips_the_random_initialisation_and_keeps_every_weight(tmp_path):
    """load_model builds the checkpoint's model with torch.nn.init switched off (the load sets every weight): no
    random numbers are drawn, the loaded weights are the saved ones, and the init functions work again afterwards."""
    from utils.load_model import no_init_weights
    for kind, model in (("llama", tiny_llama()), ("coeus", tiny_coeus())):
        path = save(tmp_path, kind, model)
        state = torch.get_rng_state()
        loaded = load_model(path)
        assert torch.equal(torch.get_rng_state(), state), kind  # nothing drawn while building
        for (n, a), b in zip(model.state_dict().items(), loaded.lm.model.state_dict().values()):
            assert torch.equal(a, b), (kind, n)
    with no_init_weights():
        w = torch.full((3, 3), 7.0)
        assert torch.nn.init.normal_(w) is w and torch.equal(w, torch.full((3, 3), 7.0))
    torch.nn.init.normal_(w)
    assert not torch.equal(w, torch.full((3, 3), 7.0))


def test_missing_and_corrupt_checkpoint(tmp_path):
    with pytest.raises(SystemExit, match="not found"):
        generate.main(["--ckpt", str(tmp_path / "nope.pt")])
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="not a readable checkpoint"):
        generate.main(["--ckpt", str(bad)])


# --- VQA / detection checkpoints ------------------------------------------------------------------------

def tiny_llava():
    torch.manual_seed(0)
    tok = CharTokenizer.train(TEXT + "?USERASSITN", specials=["<image>"])
    cfg = LlavaConfig(vision=vision_config("tiny"), text=llama_config("tiny", vocab_size=tok.vocab_size - 1,
                                                                      max_seq_len=128),
                      image_token_id=tok.token_id("<image>"))
    return LlavaModel(cfg).eval(), tok


def test_vqa_decoding_with_image_equals_full_recompute(tmp_path):
    from PIL import Image
    model, tok = tiny_llava()
    ck = save(tmp_path, "vqa", model, tok=tok, model_config=model.config.to_dict())
    img = tmp_path / "im.png"
    Image.new("RGB", (40, 30), (200, 30, 30)).save(img)
    res = generate.main(["--ckpt", ck, "--image", str(img), "--prompt", "Speak?", "--greedy",
                         "--max-new-tokens", "12", "--quiet"])
    loaded = load_model(ck)
    ids, pixels = generate.encode_prompt(loaded, "Speak?", str(img))
    assert ids.count(tok.token_id("<image>")) == model.num_image_tokens
    x = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(12):
            x = torch.cat([x, model(x, pixels)[:, -1].argmax(-1, keepdim=True)], 1)
    assert res[0]["token_ids"][0] == x[0, len(ids):].tolist()
    # the detection checkpoint's LLaVA side (keys under "llava.") generates the same
    det = save(tmp_path, "detect", model, tok=tok, name="det.pt",
               model_config={"llava": model.config.to_dict(), "detection": {}})
    sd = torch.load(det, weights_only=True)
    sd["model"] = {"llava." + k: v for k, v in sd["model"].items()}
    torch.save(sd, det)
    res2 = generate.main(["--ckpt", det, "--image", str(img), "--prompt", "Speak?", "--greedy",
                          "--max-new-tokens", "12", "--quiet"])
    assert res2[0]["token_ids"] == res[0]["token_ids"]
    with pytest.raises(SystemExit, match="needs a VQA"):
        generate.main(["--ckpt", save(tmp_path, "llama", tiny_llama()), "--image", str(img)])
    with pytest.raises(SystemExit, match="the prompt holds <image> but no --image was given"):
        generate.main(["--ckpt", ck, "--prompt", "<image> Speak?", "--max-new-tokens", "2"])
    # one --image and a prompt without the tag: the tag goes in front, as it always did
    assert generate.encode_prompt(loaded, "Speak?", [str(img)])[0] == generate.encode_prompt(loaded, "<image>\nSpeak?",
                                                                                              str(img))[0]


# --- metrics and --eval ----------------------------------------------------------------------------------

def test_degeneration_metrics_by_hand():
    s = "a b c d a b c d".split()           # 4-grams: abcd bcda cdab dabc abcd -> 5, 4 unique
    assert seq_rep_n([s], 4) == pytest.approx(0.2)
    assert seq_rep_n([s, "a b c d e".split()], 4) == pytest.approx(0.1)
    assert rep_l([s], 16) == pytest.approx(4 / 7)
    assert rep_l([s], 2) == pytest.approx(0.0)  # repeats are 4 apart
    assert distinct_n([s], 1) == pytest.approx(4 / 8)
    assert distinct_n([["x"] * 5], 2) == pytest.approx(1 / 4)
    m = degeneration_metrics([s])
    assert set(m) >= {"seq_rep_4", "rep_16", "distinct_1", "distinct_2", "distinct_3"}


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size():
    V = 13
    ids = torch.randint(0, V, (1000,))
    r = perplexity(lambda x: torch.zeros(*x.shape, V), ids, block_size=50, batch_size=3)
    assert r["ppl"] == pytest.approx(V, rel=1e-5) and r["tokens"] == 20 * 49


def test_eval_reports_greedy_sampler_and_human(tmp_path, capsys):
    """--eval on the checkpoint's own data (its args["data"], 90/10 split via utils/text_data.py)."""
    from dataclasses import asdict
    data = tmp_path / "corpus.txt"
    data.write_text(TEXT * 4)
    model = tiny_coeus()
    ck = tmp_path / "coeus.pt"
    save_atomic(dict(kind="coeus", model_config=asdict(model.config), model=model.state_dict(),
                     tokenizer=TOK.to_dict(), args={"data": str(data)}), ck)
    out = tmp_path / "report.json"
    with pytest.raises(SystemExit, match="fewer than one block of 256 .lower --eval-block"):
        generate.main(["--ckpt", str(ck), "--eval"])
    generate.main(["--ckpt", str(ck), "--eval", "--eval-samples", "4", "--max-new-tokens", "24",
                   "--eval-prompt-len", "8", "--eval-block", "64", "--eval-out", str(out)])
    r = json.loads(out.read_text())
    assert r["eval_text"].endswith("[val]") and r["perplexity"]["tokens"] > 0
    assert r["perplexity"]["ppl"] > 1 and {"greedy", "sampler", "human"} <= set(r)
    assert r["greedy"]["config"]["temperature"] == 0 and r["sampler"]["config"]["temperature"] == 0.8
    assert "seq_rep_4" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--eval-file: data file not found"):
        generate.main(["--ckpt", str(ck), "--eval", "--eval-file", str(tmp_path / "missing.txt")])


def test_hf_folder_with_sentencepiece(tmp_path, capsys):
    """A LlamaForCausalLM folder (config.json + safetensors + tokenizer.model) decodes like our model."""
    from models.hf_weights import export_pretrained
    from utils.tokenizer import SentencePieceTokenizer
    tok = SentencePieceTokenizer.train(TEXT.splitlines() * 4, 300, cache_dir=str(tmp_path / "spm"))
    model = tiny_llama(vocab=tok.vocab_size)
    folder = tmp_path / "hf"
    export_pretrained(model, str(folder))
    (folder / "tokenizer.model").write_bytes(tok.model_proto)
    res = generate.main(["--ckpt", str(folder), "--prompt", "Speak", "--greedy", "--max-new-tokens", "8",
                         "--quiet", "--ignore-eos"])
    ids = torch.tensor([[tok.bos_id] + tok.encode("Speak")])
    with torch.no_grad():
        ref = full_recompute_greedy(LlamaLM(model), ids, 8)
    assert res[0]["token_ids"][0] == ref[0].tolist()


def test_greedy_with_penalties_equals_transformers_generate():
    """Same weights in transformers' LlamaForCausalLM: its generate() picks the same tokens as ours."""
    from transformers import LlamaConfig as HFLlamaConfig, LlamaForCausalLM
    from models.hf_weights import llama_config_to_hf, ours_to_hf
    model = tiny_llama()
    hf_cfg = HFLlamaConfig(**{k: v for k, v in llama_config_to_hf(model.config).items()
                              if k not in ("architectures", "model_type")})
    hf = LlamaForCausalLM(hf_cfg).eval()
    hf.load_state_dict(ours_to_hf(model, "llama"), strict=False)
    prompts = torch.randint(0, TOK.vocab_size, (2, 7), generator=torch.Generator().manual_seed(4))
    cfg = SamplerConfig(temperature=0, repetition_penalty=1.3, no_repeat_ngram_size=2)
    with torch.no_grad():
        ours = greedy_by_decoder(LlamaLM(model), prompts, 20, cfg)
        theirs = hf.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False, max_new_tokens=20,
                             min_new_tokens=20, repetition_penalty=1.3, no_repeat_ngram_size=2, pad_token_id=0)
    assert torch.equal(ours, theirs[:, 7:])


def test_bad_prompt_file_and_bad_images_are_one_line(tmp_path):
    from tests.bad_files import write_bad_images
    tok = CharTokenizer.train(TEXT + "\ufffd")  # U+FFFD: what --replace-invalid puts in place of a bad byte
    ck = save(tmp_path, "llama", tiny_llama(tok.vocab_size), tok=tok)
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("First Citizen: caf\u00e9\n".encode("latin-1"))
    with pytest.raises(SystemExit) as e:
        generate.main(["--ckpt", ck, "--prompt-file", str(latin), "--max-new-tokens", "2"])
    msg = str(e.value)
    assert "not valid UTF-8" in msg and "offset 18" in msg and "--replace-invalid" in msg and "\n" not in msg
    res = generate.main(["--ckpt", ck, "--prompt-file", str(latin), "--replace-invalid", "--max-new-tokens", "2",
                         "--quiet", "--truncate-left"])
    assert res[0]["new_tokens"] == 2
    model, tok = tiny_llava()
    vqa = save(tmp_path, "vqa", model, tok=tok, model_config=model.config.to_dict(), name="vqa.pt")
    reasons = {"missing": "image not found", "bomb": "decompression bomb"}
    for kind, path in write_bad_images(tmp_path / "bad").items():
        with pytest.raises(SystemExit) as e:
            generate.main(["--ckpt", vqa, "--image", str(path), "--prompt", "Speak?", "--max-new-tokens", "2"])
        msg = str(e.value)
        assert msg.startswith("error: ") and str(path) in msg and reasons.get(kind, "cannot read image") in msg, msg
