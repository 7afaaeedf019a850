"""Incremental detokenization and stop strings, on tokenizers built here (no hub).

Two tokenizer families: byte-level BPE (GPT-2 / Llama-3 style, characters split over
byte tokens) and SentencePiece style (Metaspace "▁" with <0xXX> byte fallback, Llama-2
style, whose decoder strips the first leading space).
"""
from __future__ import annotations

import json
import random
from functools import lru_cache

import pytest

from raylm.engine import detokenizer as detokenizer_mod
from raylm.engine.detokenizer import (IncrementalDetokenizer, check_stop_strings, decode_single_token,
                                      stream_holdback)

CORPUS = [
    "héllo wörld 日本語 🙂 café", "the quick brown fox jumps over the lazy dog",
    "naïve façade jalapeño crème brûlée", "東京 大阪 日本 本日", "smile 🙂🙂 and wave 👋",
    "hello world, hello there. Hello again!", "Ünïcödé tëxt wïth äccents",
] * 20

# Unicode-heavy texts, including characters absent from CORPUS (so they can only be
# spelled with byte tokens): 𝄞, Cyrillic, Greek, emoji with modifiers.
TEXTS = [
    "héllo wörld 日本語 🙂 café",
    "Hello again! naïve crème brûlée, 東京 and 大阪.",
    "𝄞 music Привет мир Γειά σου 👋🏽 👩‍👩‍👧",
    "  double  spaces\tand\nnewlines  ",
    "日本日本日本🙂🙂🙂",
    "a𝄞b",
]
PROMPT = "the lazy dog said:"


@lru_cache(maxsize=None)
def byte_level_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|bos|>", "<|eos|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>")


@lru_cache(maxsize=None)
def metaspace_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                  show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    # The trainer has no byte-fallback option: add the 256 <0xXX> tokens and switch it on.
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    spec["model"]["byte_fallback"] = True
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>")


TOKENIZERS = {"byte_level": byte_level_tokenizer, "metaspace": metaspace_tokenizer}


@pytest.fixture(params=sorted(TOKENIZERS))
def tok(request):
    return TOKENIZERS[request.param]()


@pytest.fixture(autouse=True, params=["rust", "python"])
def decode_path(request, monkeypatch):
    """Every test on both paths: the fast tokenizer's Rust DecodeStream, and the Python
    window over convert_tokens_to_string (tokenizers without it, slow tokenizers)."""
    if request.param == "python":
        monkeypatch.setattr(detokenizer_mod, "_DecodeStream", None)
    return request.param


def encode(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def detokenize(tok, prompt_ids, gen_ids, skip_special_tokens=True) -> list[str]:
    detok = IncrementalDetokenizer(tok, prompt_ids, skip_special_tokens=skip_special_tokens)
    deltas = [detok.add_token(t) for t in gen_ids]
    assert detok.output_text == "".join(deltas)
    return deltas


def reference(tok, prompt_ids, gen_ids, skip_special_tokens=True) -> str:
    """What the completion reads as in the decoded prompt + completion."""
    whole = tok.decode(prompt_ids + gen_ids, skip_special_tokens=skip_special_tokens)
    prompt = tok.decode(prompt_ids, skip_special_tokens=skip_special_tokens)
    assert whole.startswith(prompt)
    return whole[len(prompt):]


def prompts(tok) -> list[list[int]]:
    return [[], [tok.bos_token_id], [tok.bos_token_id] + encode(tok, PROMPT), encode(tok, "日本🙂")]


# ---- detokenization -------------------------------------------------------------
@pytest.mark.parametrize("text", TEXTS)
def test_deltas_concatenate_to_the_full_decode(tok, text):
    gen = encode(tok, text)
    for prompt in prompts(tok):
        for skip in (True, False):
            deltas = detokenize(tok, prompt, gen, skip)
            assert "".join(deltas) == reference(tok, prompt, gen, skip)
            if tok is byte_level_tokenizer() or not prompt:
                # No prompt text to lend a leading space: the plain decode.
                assert "".join(deltas) == tok.decode(gen, skip_special_tokens=skip)


def test_byte_level_random_ids_match_decode():
    tok = byte_level_tokenizer()
    rng = random.Random(0)
    prompt = [tok.bos_token_id] + encode(tok, PROMPT)
    checked = 0
    for _ in range(300):
        gen = [rng.randrange(len(tok)) for _ in range(rng.randint(1, 40))]
        for skip in (True, False):
            full = tok.decode(gen, skip_special_tokens=skip)
            if full.endswith("\ufffd"):
                continue  # a dangling partial character is held back by design
            assert "".join(detokenize(tok, prompt, gen, skip)) == full
            checked += 1
    assert checked > 300


def test_metaspace_random_token_mix_matches_decode():
    # Random whole-vocabulary pieces, special tokens, and characters spelled as whole
    # runs of byte tokens (a random lone <0xXX> would be invalid UTF-8).
    tok = metaspace_tokenizer()
    rng = random.Random(1)
    pieces = [[i] for i, t in enumerate(tok.convert_ids_to_tokens(list(range(len(tok)))))
              if not t.startswith("<0x")]
    pieces += [encode(tok, c) for c in "𝄞Жλ👋🏽日"]
    for _ in range(300):
        gen = [t for _ in range(rng.randint(1, 25)) for t in rng.choice(pieces)]
        prompt = rng.choice(prompts(tok))
        for skip in (True, False):
            assert "".join(detokenize(tok, prompt, gen, skip)) == reference(tok, prompt, gen, skip)


@pytest.mark.parametrize("char", ["𝄞", "Ж", "🦀"])  # none is in CORPUS
def test_split_multibyte_character_never_emits_replacement_char(tok, char):
    gen = encode(tok, f"a{char}b")
    assert len(gen) >= 4, tok.convert_ids_to_tokens(gen)  # the character takes >= 2 tokens
    deltas = detokenize(tok, encode(tok, PROMPT), gen)
    assert not any("\ufffd" in d for d in deltas), deltas
    # The character appears whole, with the token that completes it.
    assert any(char in d for d in deltas) and "".join(deltas).endswith(f"{char}b")
    assert deltas.count("") >= 1  # its first byte tokens emitted nothing


def test_skip_special_tokens_drops_bos_and_eos_text(tok):
    gen = [tok.bos_token_id] + encode(tok, "café 🙂") + [tok.eos_token_id]
    prompt = encode(tok, PROMPT)
    skipped = "".join(detokenize(tok, prompt, gen, skip_special_tokens=True))
    assert tok.bos_token not in skipped and tok.eos_token not in skipped
    assert skipped == reference(tok, prompt, gen, True)
    kept = "".join(detokenize(tok, prompt, gen, skip_special_tokens=False))
    assert kept.startswith(tok.bos_token) and kept.endswith(tok.eos_token)
    assert kept == reference(tok, prompt, gen, False)


def test_leading_space_comes_from_prompt_context():
    tok = metaspace_tokenizer()
    gen = encode(tok, "hello world")  # "▁hello", "▁world": a completion of "...said:"
    assert "".join(detokenize(tok, encode(tok, PROMPT), gen)) == " hello world"
    # Nothing to continue (empty prompt, or only skipped special tokens): no leading space.
    assert "".join(detokenize(tok, [], gen)) == "hello world"
    assert "".join(detokenize(tok, [tok.bos_token_id], gen)) == "hello world"


def test_ids_outside_the_vocabulary_produce_no_text(tok):
    detok = IncrementalDetokenizer(tok, encode(tok, PROMPT))
    assert detok.add_token(len(tok) + 10) == ""
    assert detok.add_token(encode(tok, " dog")[0]) != ""


def test_work_per_token_does_not_grow_with_length(tok, decode_path, monkeypatch):
    # Per token, only a short window of tokens is decoded, however long the output (the
    # Python window, spied on here; DecodeStream keeps the same window in Rust).
    monkeypatch.setattr(detokenizer_mod, "_DecodeStream", None)
    sizes = []
    real = tok.convert_tokens_to_string

    class Spy:
        def __getattr__(self, name):
            return getattr(tok, name)

        def convert_tokens_to_string(self, tokens):
            sizes.append(len(tokens))
            return real(tokens)

    gen = encode(tok, " ".join(TEXTS)) * 50
    deltas = detokenize(Spy(), encode(tok, PROMPT), gen)
    assert "".join(deltas) == reference(tok, encode(tok, PROMPT), gen)
    assert len(gen) > 1000 and max(sizes) <= 16


def test_decode_single_token(tok):
    ids = encode(tok, "café")
    assert "".join(decode_single_token(tok, i) for i in ids).strip() == "café"
    assert decode_single_token(tok, tok.eos_token_id) == tok.eos_token
    byte_token = encode(tok, "𝄞")[-1]
    assert decode_single_token(tok, byte_token) == "\ufffd"


# ---- stop strings -----------------------------------------------------------------
def test_stop_string_split_across_deltas():
    # "Hello wor" arrived earlier; "ld!" completes "world".
    assert check_stop_strings("Hello world!", 3, ["world"], False) == ("world", 6)
    assert check_stop_strings("Hello world!", 3, ["world"], True) == ("world", 11)
    assert check_stop_strings("Hello world!", 1, ["world"], False) is None  # completed earlier


def test_stop_string_entirely_in_old_text_is_not_rematched():
    assert check_stop_strings("world and more", 4, ["world"], False) is None
    assert check_stop_strings("abc", 0, ["abc"], False) is None
    assert check_stop_strings("abc", 3, [], False) is None


def test_earliest_match_wins():
    assert check_stop_strings("xx END yy STOP", 14, ["STOP", "END"], False) == ("END", 3)
    # Overlapping: "bc" completes before "abcd" would have, as a char-by-char
    # generation would have seen it.
    assert check_stop_strings("abcd", 4, ["abcd", "bc"], False) == ("bc", 1)
    # Both complete at the same character: the one that starts first.
    assert check_stop_strings("abc", 3, ["bc", "abc"], True) == ("abc", 3)
    assert check_stop_strings("abc", 3, ["bc", "abc"], False) == ("abc", 0)
    # Repeated occurrences inside one delta: the first one.
    assert check_stop_strings("a.b.c.", 6, ["."], False) == (".", 1)


def run_with_stops(tok, gen, stop, include):
    """Detokenize and check stops after each token, as the engine does; also stream
    with the hold-back and check nothing streamed is later taken back."""
    detok = IncrementalDetokenizer(tok, encode(tok, PROMPT))
    text, streamed, hold = "", "", stream_holdback(stop)
    for token in gen:
        delta = detok.add_token(token)
        text += delta
        hit = check_stop_strings(text, len(delta), stop, include)
        if hit is not None:
            text = text[:hit[1]]
            assert text.startswith(streamed)
            return text, hit[0]
        streamed = text[:len(text) - hold]
    assert text.startswith(streamed)
    return text, None


@pytest.mark.parametrize("stop", ["llo w", "本語 🙂", "wörld 日", "🙂 café", "lo wö"])
def test_stop_strings_split_across_tokens(tok, stop):
    prompt, gen = encode(tok, PROMPT), encode(tok, TEXTS[0])
    assert not any(stop in tok.decode([t]) for t in gen)  # no single token holds it
    full = reference(tok, prompt, gen)
    for include in (False, True):
        text, found = run_with_stops(tok, gen, [stop, "never there"], include)
        assert found == stop
        assert text == full[:full.find(stop) + (len(stop) if include else 0)]


def test_random_stop_strings_match_first_occurrence(tok):
    rng = random.Random(2)
    prompt = encode(tok, PROMPT)
    for text in TEXTS:
        gen = encode(tok, text)
        full = reference(tok, prompt, gen)
        for _ in range(20):
            i = rng.randrange(len(full))
            stop = full[i:i + rng.randint(1, 6)]
            text_out, found = run_with_stops(tok, gen, [stop], False)
            assert found == stop and text_out == full[:full.find(stop)]


def test_stream_holdback():
    assert stream_holdback([]) == 0
    assert stream_holdback(["a"]) == 0
    assert stream_holdback(["a", "abcd", "xy"]) == 3


def test_fast_tokenizers_decode_in_rust(tok, decode_path):
    detok = IncrementalDetokenizer(tok, encode(tok, PROMPT))
    assert (detok._stream is not None) == (decode_path == "rust")


def test_tokens_without_text_stay_out_of_the_rust_stream(tok, decode_path):
    """Skipped special tokens and ids past the vocabulary never reach DecodeStream, whose
    buffer would grow with each (a random model's run of EOS made every token slower)."""
    detok = IncrementalDetokenizer(tok, encode(tok, PROMPT))
    if decode_path == "python":
        assert detok._stream is None
        return
    steps = []
    real = detok._stream

    class Spy:
        def step(self, backend, token_id):
            steps.append(token_id)
            return real.step(backend, token_id)

    detok._stream = Spy()
    for _ in range(1000):
        assert detok.add_token(tok.eos_token_id) == ""
        assert detok.add_token(len(tok) + 5) == ""
    assert steps == []
    word = encode(tok, " dog")
    assert "".join(detok.add_token(t) for t in word) == reference(tok, encode(tok, PROMPT), word)
    assert steps == word
