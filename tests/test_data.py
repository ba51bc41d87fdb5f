"""data.py and extras/formats.py: tokenizers, JSONL records and their errors, the built-in data, truncation and collate."""
import json
import os
import random

import pytest
import tiktoken

from conftest import GPT2_RANKS
from data import (DataError, arith_solution, answer_of, batch_indices, builtin_data, collate,
                  edit_distance, load_tokenizer, tokenize_pairs)
from extras.formats import parse_jsonl, render_messages, split_conversation, split_shared_prompt
from extras.speedups import collate_shared

E = 256  # end-of-text in the byte tokenizer


def test_byte_tokenizer_round_trip():
    enc = load_tokenizer("byte")
    assert enc.n_vocab == 257 and enc.eot_token == E
    text = "347+589= héllo"
    ids = enc.encode_ordinary(text)
    assert ids == list(text.encode("utf-8")) and enc.decode(ids) == text


@pytest.mark.skipif(not os.path.exists(GPT2_RANKS), reason="shared/data/gpt2.tiktoken not present")
def test_gpt2_ranks_file():
    enc = load_tokenizer(GPT2_RANKS)
    assert enc.encode_ordinary("Hello world") == [15496, 995]
    assert enc.n_vocab == 50257 and enc.eot_token == 50256


def test_tokenizer_errors(monkeypatch, tmp_path):
    with pytest.raises(DataError, match="not 'byte', a tiktoken encoding"):
        load_tokenizer("gtp2")

    def offline(name):
        raise ConnectionError("no network")
    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(DataError, match="could not download it.*local .tiktoken ranks file"):
        load_tokenizer("gpt2")
    bad = tmp_path / "bad.tiktoken"
    bad.write_text("not base64 at all\n")
    with pytest.raises(DataError, match="bad.tiktoken: not a .tiktoken ranks file"):
        load_tokenizer(str(bad))


def test_load_preferences_accepts_bom_crlf_blank_lines(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "Q", "chosen": "yes", "rejected": "no", "id": 1}\r\n'
                     b'\r\n'
                     b'{"prompt": "", "chosen": "a", "rejected": "a"}\n'
                     b'{"prompt": "P", "chosen": "\xc3\xa9", "rejected": "e"}\n')
    records, n_identical = parse_jsonl(str(path))
    assert records == [{"prompt": "Q", "chosen": "yes", "rejected": "no"},
                       {"prompt": "P", "chosen": "é", "rejected": "e"}]
    assert n_identical == 1


@pytest.mark.parametrize("line, message", [
    (b'{"prompt": "Q", "chosen": "a", "rejected": "b"', "invalid JSON"),
    (b'["Q", "a", "b"]', "expected a JSON object"),
    (b'{"prompt": "Q", "chosen": "a"}', "missing field 'rejected'"),
    (b'{"prompt": "Q", "chosen": 3, "rejected": "b"}', "field 'chosen' must be a string or a list of messages, not int"),
    (b'{"prompt": "Q", "chosen": "a", "rejected": ""}', "field 'rejected' is empty"),
    (b'{"prompt": "Q", "chosen": "\xff", "rejected": "b"}', "not valid UTF-8"),
])
def test_bad_jsonl_lines_name_path_and_line(tmp_path, line, message):
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(b'{"prompt": "Q", "chosen": "a", "rejected": "b"}\n\n' + line + b"\n")
    with pytest.raises(DataError) as err:
        parse_jsonl(str(path))
    assert str(err.value).startswith(f"{path}:3: ") and message in str(err.value)
    assert "\n" not in str(err.value)


def test_empty_or_missing_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    with pytest.raises(DataError, match="no preference pairs"):
        parse_jsonl(str(path))
    with pytest.raises(DataError, match="cannot read"):
        parse_jsonl(str(tmp_path / "nope.jsonl"))


def test_arith_solution_and_answer():
    text, results = arith_solution(347, 589)
    assert text == "7+9=16; 4+8+1=13; 3+5+1=9; answer 936" and results == [16, 13, 9]
    assert answer_of(text) == 936 and answer_of("7+9=16; answ") is None
    assert arith_solution(999, 999)[0].endswith("answer 1998")


def test_builtin_low_edit_distance_data():
    ds = builtin_data("arith")
    assert ds == builtin_data("arith")  # deterministic
    prompts = [{r["prompt"] for r in ds[k]} for k in ("train", "eval")] + [{p for p, _ in ds["test"]}]
    assert not (prompts[0] & prompts[1]) and not (prompts[0] & prompts[2]) and not (prompts[1] & prompts[2])
    for rec in ds["train"][:500]:
        a, b = map(int, rec["prompt"][:-1].split("+"))
        assert rec["chosen"] == arith_solution(a, b)[0]
        steps_c, steps_r = rec["chosen"].split("; "), rec["rejected"].split("; ")
        differ = [i for i, (x, y) in enumerate(zip(steps_c, steps_r)) if x != y]
        assert len(differ) == 1 and differ[0] < 3  # exactly one intermediate result, never the answer
    assert all(answer == eval(p[:-1]) for p, answer in ds["test"])


def test_builtin_high_edit_distance_data():
    ds = builtin_data("arith-hed")
    for rec in ds["train"][:200]:
        assert answer_of(rec["rejected"]) != eval(rec["prompt"][:-1])
    with pytest.raises(DataError, match="unknown built-in data"):
        builtin_data("arith-xl")


def test_tokenize_pairs_joins_with_exact_boundary_and_truncates():
    enc = load_tokenizer("byte")
    recs = [{"prompt": "abcdef", "chosen": "XY", "rejected": "Z"}]
    (prompt, chosen, rejected), = tokenize_pairs(recs, enc, block_size=32)[0]
    assert prompt == [E] + list(b"abcdef") and chosen == list(b"XY") + [E] and rejected == list(b"Z") + [E]
    # block_size 5 holds 6 tokens: the longer completion has 3, so the prompt keeps its last 3
    pairs, n_cut, n_drop = tokenize_pairs(recs, enc, block_size=5)
    assert pairs == [(list(b"def"), list(b"XY") + [E], list(b"Z") + [E])] and (n_cut, n_drop) == (1, 0)
    # block_size 2: one prompt token, completions cut from the right to 2 tokens
    pairs, _, _ = tokenize_pairs(recs, enc, block_size=2)
    assert pairs == [([ord("f")], list(b"XY"), list(b"Z") + [E])]
    # a cut that makes chosen and rejected identical drops the pair
    same_start = [{"prompt": "p", "chosen": "AAAx", "rejected": "AAAy"}]
    assert tokenize_pairs(same_start, enc, block_size=3)[1:] == (1, 1)


def test_collate_alignment_hand_written():
    pairs = [([E, ord("1"), ord("=")], [ord("1"), E], [ord("2"), ord("2"), E])]
    idx, targets, mask = collate(pairs, pad_id=E)
    one, eq, two = ord("1"), ord("="), ord("2")
    assert idx.tolist() == [[E, one, eq, one, E], [E, one, eq, two, two]]
    assert targets.tolist() == [[one, eq, one, E, E], [one, eq, two, two, E]]
    assert mask.tolist() == [[0, 0, 1, 1, 0], [0, 0, 1, 1, 1]]
    # the masked targets are exactly the completions, chosen rows first
    assert targets[0][mask[0]].tolist() == pairs[0][1] and targets[1][mask[1]].tolist() == pairs[0][2]


def test_collate_on_built_in_pairs_masks_exactly_the_completions():
    enc = load_tokenizer("byte")
    pairs, _, _ = tokenize_pairs(builtin_data("arith")["train"][:8], enc, 64)
    idx, targets, mask = collate(pairs, E)
    for i, (p, c, r) in enumerate(pairs):
        assert targets[i][mask[i]].tolist() == c and targets[8 + i][mask[8 + i]].tolist() == r
        assert idx[i, :len(p)].tolist() == p


def naive_edit_distance(a, b):
    d = [[i + j if i * j == 0 else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
    return d[-1][-1]


def test_edit_distance_matches_naive_dp():
    rng = random.Random(0)
    for _ in range(300):
        a = [rng.randrange(4) for _ in range(rng.randrange(12))]
        b = [rng.randrange(4) for _ in range(rng.randrange(12))]
        assert edit_distance(a, b) == naive_edit_distance(a, b), (a, b)
    assert edit_distance(list("kitten"), list("sitting")) == 3


def test_batch_indices_cover_each_epoch_once_and_are_pure():
    n, bs = 10, 3
    stream = [i for step in range(10) for i in batch_indices(n, bs, step, seed=7)]
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))
    assert stream[10:20] != stream[:10]  # a new permutation each epoch
    assert batch_indices(n, bs, 4, seed=7) == batch_indices(n, bs, 4, seed=7)
    assert batch_indices(n, bs, 0, seed=7) != batch_indices(n, bs, 0, seed=8)
    with pytest.raises(DataError, match="lower --batch-size"):
        batch_indices(n, 11, 0, seed=7)


def test_implicit_prompt_lines(tmp_path):
    path = tmp_path / "hh.jsonl"
    path.write_text(json.dumps({"chosen": "Human: 2+2?\n\nAssistant: It is 4.",
                                "rejected": "Human: 2+2?\n\nAssistant: It is 5."}) + "\n" +
                    json.dumps({"chosen": "yes", "rejected": "no"}) + "\n" +
                    json.dumps({"prompt": "P", "chosen": "a", "rejected": "b"}) + "\n" +
                    json.dumps({"chosen": "only chosen"}) + "\n")
    with pytest.raises(DataError, match=r"hh.jsonl:4: missing field 'rejected'"):
        parse_jsonl(str(path))
    path.write_text("\n".join(path.read_text().splitlines()[:3]))
    records, _ = parse_jsonl(str(path))
    assert records == [{"prompt": "Human: 2+2?\n\nAssistant: It is", "chosen": " 4.", "rejected": " 5."},
                       {"prompt": "", "chosen": "yes", "rejected": "no"},
                       {"prompt": "P", "chosen": "a", "rejected": "b"}]


@pytest.mark.skipif(not os.path.exists(GPT2_RANKS), reason="shared/data/gpt2.tiktoken not present")
@pytest.mark.parametrize("chosen, rejected", [
    ("Human: What is the capital of France?\n\nAssistant: Paris, of course.",
     "Human: What is the capital of France?\n\nAssistant: Lyon, I think."),
    ("The answer is 1247 apples", "The answer is 1249 apples"),
    ("Q:  two  spaces  here", "Q:  two  spaces  there"),
    ("347+589=936", "347+589=935"),  # no whitespace in the shared beginning
    ("答案是：九百三十六", "答案是：九百三十五"),  # CJK: no spaces at all
])
def test_implicit_prompt_split_is_a_gpt2_token_boundary(chosen, rejected):
    enc = load_tokenizer(GPT2_RANKS)
    prompt, c, r = split_shared_prompt(chosen, rejected)
    assert prompt + c == chosen and prompt + r == rejected and prompt  # a prompt was found
    for full, completion in ((chosen, c), (rejected, r)):
        assert enc.encode_ordinary(prompt) + enc.encode_ordinary(completion) == enc.encode_ordinary(full)


def test_collate_shared_packs_the_docstring_example():
    pairs = [([E, ord("1"), ord("=")], [ord("1"), E], [ord("2"), ord("2"), E]),
             ([E], [ord("a"), E], [E])]  # a shorter pair: padded; its rejected is a lone E
    idx, pos, attn_mask, where, targets, seq = collate_shared(pairs, E)
    assert idx[0].tolist() == [E, ord("1"), ord("="), ord("1"), ord("2"), ord("2")]
    assert pos[0].tolist() == [0, 1, 2, 3, 3, 4]
    assert idx[1, :2].tolist() == [E, ord("a")] and pos[1, :2].tolist() == [0, 1]
    # row 0: the rejected columns 4 and 5 read the prompt and themselves, never column 3
    assert attn_mask[0, 4].tolist() == [True, True, True, False, True, False]
    assert attn_mask[0, 5].tolist() == [True, True, True, False, True, True]
    assert attn_mask[0, 3].tolist() == [True, True, True, True, False, False]  # chosen: causal
    # (row, column, target, sequence) of every completion token: chosen 0, chosen 1, rejected 0, rejected 1
    got = list(zip(where[0].tolist(), where[1].tolist(), targets.tolist(), seq.tolist()))
    assert got == [(0, 2, ord("1"), 0), (0, 3, E, 0),
                   (0, 2, ord("2"), 2), (0, 4, ord("2"), 2), (0, 5, E, 2),
                   (1, 0, ord("a"), 1), (1, 1, E, 1),
                   (1, 0, E, 3)]


# ---------------------------------------------------------------------------------------------
# The conversational form: lists of {"role", "content"} messages

def msg(role, content):
    return {"role": role, "content": content}


SYS, Q, A4, A5 = msg("system", "Be brief."), msg("user", "2+2?"), msg("assistant", "It is 4."), msg("assistant", "It is 5.")
QA = "\n\nHuman: 2+2?\n\nAssistant:"


def write_lines(path, *objs):
    path.write_text("".join(json.dumps(obj) + "\n" for obj in objs))
    return str(path)


def test_conversational_lines(tmp_path):
    path = write_lines(
        tmp_path / "conv.jsonl",
        {"prompt": [Q], "chosen": [A4], "rejected": [A5], "score_chosen": 9.0, "id": 7},
        {"chosen": [Q, A4], "rejected": [Q, A5], "messages": [Q, A4]},
        {"prompt": [SYS, Q], "chosen": [A4], "rejected": [A5]},
        {"chosen": [Q, A5, msg("user", "Sure?"), A4],  # multi-turn, with a second assistant message
         "rejected": [Q, A5, msg("user", "Sure?"), A5, msg("assistant", "Yes.")]},
        {"chosen": [Q, A4], "rejected": [Q, A4]},  # identical: skipped
        {"prompt": "P", "chosen": "a", "rejected": "b"})  # the forms may be mixed line by line
    records, n_identical = parse_jsonl(path)
    assert records == [
        {"prompt": QA, "chosen": " It is 4.", "rejected": " It is 5."},
        {"prompt": QA, "chosen": " It is 4.", "rejected": " It is 5."},
        {"prompt": "\n\nSystem: Be brief." + QA, "chosen": " It is 4.", "rejected": " It is 5."},
        {"prompt": QA + " It is 5.\n\nHuman: Sure?\n\nAssistant:", "chosen": " It is 4.",
         "rejected": " It is 5.\n\nAssistant: Yes."},
        {"prompt": "P", "chosen": "a", "rejected": "b"}]
    assert n_identical == 1
    # prompt + completion is the whole conversation, rendered
    multi = records[3]
    assert multi["prompt"] + multi["rejected"] == render_messages(
        [(m["role"], m["content"]) for m in [Q, A5, msg("user", "Sure?"), A5, msg("assistant", "Yes.")]])


def test_conversational_mask_covers_exactly_the_reply(tmp_path):
    path = write_lines(tmp_path / "conv.jsonl", {"prompt": [SYS, Q], "chosen": [A4], "rejected": [A5]},
                       {"chosen": [Q, A4], "rejected": [Q, msg("assistant", "Five.")]})
    enc = load_tokenizer("byte")
    records, _ = parse_jsonl(path)
    pairs, n_cut, n_drop = tokenize_pairs(records, enc, block_size=64)
    assert (n_cut, n_drop) == (0, 0)
    idx, targets, mask = collate(pairs, E)
    replies = [(" It is 4.", " It is 5."), (" It is 4.", " Five.")]
    for i, (chosen, rejected) in enumerate(replies):
        for row, reply in ((i, chosen), (len(pairs) + i, rejected)):
            assert targets[row][mask[row]].tolist() == list(reply.encode()) + [E]
            prompt_ids = idx[row, :int(mask[row].nonzero()[0]) + 1].tolist()  # what is read before the reply
            assert enc.decode(prompt_ids[1:]).endswith("\n\nAssistant:") and prompt_ids[0] == E


@pytest.mark.skipif(not os.path.exists(GPT2_RANKS), reason="shared/data/gpt2.tiktoken not present")
def test_conversational_split_is_a_gpt2_token_boundary():
    enc = load_tokenizer(GPT2_RANKS)
    prompt, c, r = split_conversation(None, [("user", "Capital of France?"), ("assistant", "Paris, of course.")],
                                      [("user", "Capital of France?"), ("assistant", "\nLyon... I think.")])
    for completion in (c, r):
        assert enc.encode_ordinary(prompt) + enc.encode_ordinary(completion) == enc.encode_ordinary(prompt + completion)


@pytest.mark.parametrize("obj, message", [
    ({"chosen": [Q, A4], "rejected": "2+2? It is 5."},
     "field 'rejected' is a string but 'chosen' is a list of messages"),
    ({"prompt": [Q], "chosen": ["It is 4."], "rejected": [A5]},
     """field 'chosen', message 1: expected an object with "role" and "content\""""),
    ({"prompt": [SYS, {"role": "user"}], "chosen": [A4], "rejected": [A5]},
     """field 'prompt', message 2: expected an object with "role" and "content\""""),
    ({"prompt": [msg("user", ["2+2?"])], "chosen": [A4], "rejected": [A5]},
     """field 'prompt', message 1: "content" must be a string (text only), not list"""),
    ({"prompt": [msg("tool", "4")], "chosen": [A4], "rejected": [A5]},
     "field 'prompt', message 1: unknown role 'tool'; use system, user, assistant"),
    ({"prompt": [], "chosen": [A4], "rejected": [A5]}, "field 'prompt' is an empty conversation"),
    ({"prompt": [Q], "chosen": [A4], "rejected": []}, "field 'rejected' is an empty conversation"),
    ({"prompt": [Q], "chosen": [msg("user", "Hm?"), A4], "rejected": [A5]},
     "field 'chosen', message 1: a 'user' message where the assistant's reply should be; "
     "the conversation before the reply belongs in 'prompt'"),
    ({"chosen": [Q, A4], "rejected": [msg("user", "3+3?"), A5]},
     "fields 'chosen' and 'rejected' differ from their first message"),
    ({"chosen": [A4], "rejected": [A5]}, "fields 'chosen' and 'rejected' differ from their first message"),
    ({"chosen": [Q, A4, msg("user", "And 3+3?"), A4], "rejected": [Q, A4, msg("user", "And 2+3?"), A5]},
     "field 'chosen', message 3: a 'user' message where the assistant's reply should be; "
     "chosen and rejected must share every message before the reply"),
    ({"chosen": [Q, A4], "rejected": [Q, A4, A5]}, "field 'chosen' has no message after the conversation"),
    ({"prompt": [Q], "chosen": [msg("system", "Be brief.")], "rejected": [A5]},
     "field 'chosen', message 1: a 'system' message where the assistant's reply should be"),
])
def test_bad_conversational_lines_name_path_line_and_field(tmp_path, obj, message):
    path = write_lines(tmp_path / "conv.jsonl", {"prompt": [Q], "chosen": [A4], "rejected": [A5]}, obj)
    with pytest.raises(DataError) as err:
        parse_jsonl(path)
    assert str(err.value).startswith(f"{path}:2: ") and message in str(err.value)
    assert "\n" not in str(err.value)


def test_implicit_prompt_lines_without_a_shared_beginning_are_counted(tmp_path, capsys):
    path = tmp_path / "hh.jsonl"
    lines = [{"chosen": "Human: hi Assistant: hello", "rejected": "Human: hi Assistant: go"},
             {"chosen": "yes", "rejected": "no"}, {"chosen": "a b", "rejected": "c d"}]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    records, _ = parse_jsonl(str(path))
    assert [r["prompt"] for r in records] == ["Human: hi Assistant:", "", ""]
    assert "2 of 3 pairs have no \"prompt\" and chosen and rejected texts that share no beginning" \
        in capsys.readouterr().out
    parse_jsonl(str(path), quiet=True)
    assert capsys.readouterr().out == ""


def test_no_whitespace_split_and_the_warnings_say_what_happened(tmp_path, capsys):
    assert split_shared_prompt("347+589=936", "347+589=935") == ("347+589=", "936", "935")
    path = tmp_path / "mixed.jsonl"
    lines = [{"chosen": "347+589=936", "rejected": "347+589=935"},  # a prompt at the "=" boundary
             {"chosen": "abc", "rejected": "abd"},  # a shared beginning inside one word
             {"chosen": "yes", "rejected": "no"}]  # nothing shared
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    records, _ = parse_jsonl(str(path))
    assert [r["prompt"] for r in records] == ["347+589=", "", ""]
    out = capsys.readouterr().out
    assert "1 of 3 pairs have no \"prompt\" and chosen and rejected texts whose shared beginning has no word" in out
    assert "1 of 3 pairs have no \"prompt\" and chosen and rejected texts that share no beginning" in out


def test_a_string_prompt_with_whole_conversations_is_read(tmp_path):
    """HuggingFaceH4/ultrafeedback_binarized: "prompt" a string, "chosen" and "rejected" the whole
    conversations, which repeat it as their user turn (after a system message here)."""
    user, system = {"role": "user", "content": "2+2?"}, {"role": "system", "content": "Be brief."}
    line = {"prompt": "2+2?", "chosen": [system, user, {"role": "assistant", "content": "4"}],
            "rejected": [system, user, {"role": "assistant", "content": "5"}]}
    path = tmp_path / "uf.jsonl"
    path.write_text(json.dumps(line) + "\n" + json.dumps({**line, "prompt": "2+3?"}) + "\n")
    with pytest.raises(DataError) as err:
        parse_jsonl(str(path))
    assert str(err.value) == (f"{path}:2: field 'chosen', message 2: its user turn differs from 'prompt' at "
                              f"character 3 ('2?' vs '3?'); with message lists, a string 'prompt' must be "
                              f"their last user turn")
    replies = {"prompt": "2+2?", "chosen": [{"role": "assistant", "content": "4"}],
               "rejected": [{"role": "assistant", "content": "5"}]}  # the replies alone
    path.write_text(json.dumps(line) + "\n" + json.dumps(replies) + "\n")
    assert parse_jsonl(str(path))[0] == [
        {"prompt": "\n\nSystem: Be brief.\n\nHuman: 2+2?\n\nAssistant:", "chosen": " 4", "rejected": " 5"},
        {"prompt": "\n\nHuman: 2+2?\n\nAssistant:", "chosen": " 4", "rejected": " 5"}]


def test_the_held_out_split_is_a_fixed_shuffle():
    """hold_out holds out a fixed 5%, drawn from the whole file (not its first lines), the same
    every time; the rest trains, nothing lost or repeated."""
    from extras.splits import hold_out
    records = list(range(200))
    train, held = hold_out(records)
    assert len(held) == 10 and sorted(train + held) == records
    assert held != records[:10] and held != records[-10:] and hold_out(records) == (train, held)


def test_data_files_that_are_not_utf8_text_say_what_they_are(tmp_path):
    """A compressed or UTF-16 file is named for what it is, with the fix; old Mac line endings
    (a lone \\r) are read as line ends."""
    import gzip
    line = json.dumps({"prompt": "1+1=", "chosen": " 2", "rejected": " 3"})
    cases = {"d.jsonl.gz": (gzip.compress(line.encode()), "not JSON Lines text but a gzip-compressed file (gunzip it)"),
             "u16.jsonl": (line.encode("utf-16"), "not JSON Lines text but UTF-16 text (save it as UTF-8)")}
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(DataError) as err:
            parse_jsonl(str(tmp_path / name))
        assert str(err.value) == f"{tmp_path / name}: {message}"
    (tmp_path / "mac.jsonl").write_bytes((line + "\r" + line.replace(" 3", " 4") + "\r").encode())
    assert [r["rejected"] for r in parse_jsonl(str(tmp_path / "mac.jsonl"))[0]] == [" 3", " 4"]
