"""Your own preference data: JSON Lines files in the forms people download (explicit prompt,
Anthropic HH's implicit prompt, TRL's conversations, UltraFeedback's repeated prompt), parsed into
records {"prompt", "chosen", "rejected"} of strings. Which data a run reads, and what it holds out,
is extras/splits.py's.

Not a lesson file: data.py takes the records, whichever form they came from.
"""
import json

import regex

from data import GPT2_PATTERN, DataError


# ---------------------------------------------------------------------------------------------
# Your own data: records from JSON Lines

def split_shared_prompt(chosen, rejected):
    """The implicit-prompt form (Anthropic HH style): two full texts whose shared beginning is the
    prompt. The longest common prefix is cut back to just before its last whitespace character,
    so that the completions start where a word does and GPT-2's pre-tokenizer, which starts a
    word's token at the space before it, splits the prompt exactly where it splits the whole text.
        split_shared_prompt("Human: 2+2? Assistant: It is 4", "Human: 2+2? Assistant: It is 5")
        -> ("Human: 2+2? Assistant: It is", " 4", " 5")
    When the shared beginning holds no whitespace ("347+589=936" and "347+589=935", or CJK text),
    the prompt ends at the last place before the first difference where GPT-2's pre-tokenizer
    splits both texts, so the prompt still tokenizes as the whole text does:
        split_shared_prompt("347+589=936", "347+589=935") -> ("347+589=", "936", "935")
    """
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    n = shared
    while n > 0 and not chosen[n - 1].isspace():
        n -= 1
    n = max(0, n - 1)  # before the whitespace
    if n == 0 and shared:  # no whitespace to cut at: a pre-tokenizer boundary of both texts
        both = set(chunk_starts(chosen)) & set(chunk_starts(rejected))  # 0 is in both
        n = max(i for i in both if i <= shared)
    return chosen[:n], chosen[n:], rejected[n:]


def chunk_starts(text):
    """Where GPT-2's pre-tokenizer starts each chunk of text (BPE never merges across them)."""
    return [m.start() for m in regex.finditer(GPT2_PATTERN, text)]


# The conversational form's messages become text in Anthropic HH's template ("\n\nHuman: ..." and
# "\n\nAssistant: ..."), with a "System" role added.
ROLE_NAMES = {"system": "System", "user": "Human", "assistant": "Assistant"}
ASSISTANT = "\n\nAssistant:"  # the header that ends every conversational prompt


def render_messages(messages):
    r"""(role, content) pairs as text, each one "\n\n{name}: {content}":
        render_messages([("user", "2+2?"), ("assistant", "It is 4.")]) -> "\n\nHuman: 2+2?\n\nAssistant: It is 4."
    """
    return "".join(f"\n\n{ROLE_NAMES[role]}: {content}" for role, content in messages)


def read_messages(field, messages):
    """A conversational field, a list of {"role", "content"} objects (other keys are ignored), as
    (role, content) pairs. Raises DataError, without the file's location, if it is malformed."""
    if not messages:
        raise DataError(f"field {field!r} is an empty conversation; give it at least one message")
    pairs = []
    for i, m in enumerate(messages, start=1):
        where = f"field {field!r}, message {i}"
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f'{where}: expected an object with "role" and "content", '
                            f'e.g. {{"role": "user", "content": "Hi"}}')
        if not isinstance(m["role"], str) or m["role"] not in ROLE_NAMES:
            raise DataError(f"{where}: unknown role {m['role']!r}; use {', '.join(ROLE_NAMES)}")
        if not isinstance(m["content"], str):
            raise DataError(f'{where}: "content" must be a string (text only), not {type(m["content"]).__name__}')
        pairs.append((m["role"], m["content"]))
    return pairs


def split_conversation(prompt, chosen, rejected):
    r"""The conversational form (TRL's, and most downloadable preference sets'): prompt, chosen
    and rejected are lists of (role, content) pairs from read_messages. The prompt is the
    conversation so far plus the assistant's header, so each completion is the assistant's reply
    alone, starting with a space (as in split_shared_prompt), and prompt + completion is exactly
    render_messages of the whole conversation:
        split_conversation([("user", "2+2?")], [("assistant", "It is 4.")], [("assistant", "It is 5.")])
        -> ("\n\nHuman: 2+2?\n\nAssistant:", " It is 4.", " It is 5.")
    With prompt None, chosen and rejected are whole conversations and the prompt is the messages
    they share at the start (whole messages are compared, not characters):
        split_conversation(None, [("user", "2+2?"), ("assistant", "It is 4.")],
                                 [("user", "2+2?"), ("assistant", "It is 5.")])  -> the same
    The reply must be assistant messages only (usually one; several are rendered one after the
    other), so that the mask never trains the model to write the user's turns. Anything else
    raises DataError, without the file's location.
    """
    n = 0  # the messages of chosen and rejected before their reply
    if prompt is None:
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
        if n == 0:
            raise DataError("fields 'chosen' and 'rejected' differ from their first message; without "
                            "'prompt', they must share the conversation before the assistant's reply")
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
    for field, reply in (("chosen", chosen), ("rejected", rejected)):
        if not reply:
            raise DataError(f"field {field!r} has no message after the conversation it shares with the "
                            f"other field; without 'prompt', each must end with its own assistant reply")
        for i, (role, _) in enumerate(reply, start=n + 1):
            if role != "assistant":
                hint = ("chosen and rejected must share every message before the reply" if n else
                        "the conversation before the reply belongs in 'prompt'")
                raise DataError(f"field {field!r}, message {i}: a {role!r} message where the "
                                f"assistant's reply should be; {hint}")
    # the reply starts with the assistant's header, which ends the prompt: cut it off the completion
    return (render_messages(prompt) + ASSISTANT, render_messages(chosen)[len(ASSISTANT):],
            render_messages(rejected)[len(ASSISTANT):])


def record_from_json(obj):
    """One JSONL object as a record {"prompt", "chosen", "rejected"} of strings, whatever its form
    (see parse_jsonl), or None when chosen and rejected are the same (no preference).
    Raises DataError, without the file's location: parse_jsonl adds it."""
    if isinstance(obj.get("prompt"), str) and all(isinstance(obj.get(f), list) for f in ("chosen", "rejected")):
        return record_with_repeated_prompt(obj)
    fields = ("prompt", "chosen", "rejected") if "prompt" in obj else ("chosen", "rejected")
    kind = {str: "a string", list: "a list of messages"}
    for field in fields:
        if field not in obj:
            raise DataError(f"missing field {field!r}")
        if type(obj[field]) not in kind:
            raise DataError(f"field {field!r} must be a string or a list of messages, "
                            f"not {type(obj[field]).__name__}")
        if type(obj[field]) is not type(obj[fields[0]]):
            raise DataError(f"field {field!r} is {kind[type(obj[field])]} but {fields[0]!r} is "
                            f"{kind[type(obj[fields[0]])]}; write {', '.join(fields)} all as strings "
                            f"or all as lists of messages")
    if isinstance(obj["chosen"], list):
        messages = {field: read_messages(field, obj[field]) for field in fields}
        if messages["chosen"] == messages["rejected"]:
            return None
        prompt, chosen, rejected = split_conversation(messages.get("prompt"), messages["chosen"],
                                                      messages["rejected"])
    else:
        for field in ("chosen", "rejected"):
            if not obj[field]:
                raise DataError(f"field {field!r} is empty")
        if obj["chosen"] == obj["rejected"]:
            return None
        if "prompt" in obj:
            prompt, chosen, rejected = obj["prompt"], obj["chosen"], obj["rejected"]
        else:
            prompt, chosen, rejected = split_shared_prompt(obj["chosen"], obj["rejected"])
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def record_with_repeated_prompt(obj):
    """HuggingFaceH4/ultrafeedback_binarized's shape: a string "prompt", and "chosen" and
    "rejected" whole conversations that repeat it as their user turn:
        {"prompt": "2+2?", "chosen": [{"role": "user", "content": "2+2?"}, {"role": "assistant", ...}], ...}
    read as the conversations alone (the prompt is the messages they share), once the last shared
    user turn is checked to be the prompt; otherwise DataError, naming where they differ. Lists
    that hold the replies alone take the string as the user's turn before them."""
    chosen, rejected = read_messages("chosen", obj["chosen"]), read_messages("rejected", obj["rejected"])
    if chosen[0][0] == "assistant":  # the replies alone: the string is the user's turn
        return record_from_json({"prompt": [{"role": "user", "content": obj["prompt"]}],
                                 "chosen": obj["chosen"], "rejected": obj["rejected"]})
    record = record_from_json({"chosen": obj["chosen"], "rejected": obj["rejected"]})
    if record is None:
        return None
    n = 0  # the messages they share: the conversation before the reply
    while chosen[n] == rejected[n]:
        n += 1
    i, turn = ([(i, c) for i, (role, c) in enumerate(chosen[:n], start=1) if role == "user"] or [(1, "")])[-1]
    if turn != obj["prompt"]:
        at = next((k for k, (a, b) in enumerate(zip(turn, obj["prompt"])) if a != b), min(len(turn), len(obj["prompt"])))
        raise DataError(f"field 'chosen', message {i}: its user turn differs from 'prompt' at character {at + 1} "
                        f"({turn[at:at + 20]!r} vs {obj['prompt'][at:at + 20]!r}); with message lists, a "
                        f"string 'prompt' must be their last user turn")
    return record


# What a data file that is not UTF-8 text is, by its first bytes
PACKED = {b"\x1f\x8b": "a gzip-compressed file (gunzip it)", b"PK\x03\x04": "a zip archive (unzip it)",
          b"BZh": "a bzip2-compressed file (bunzip2 it)", b"\xfd7zXZ\x00": "an xz-compressed file (unxz it)",
          b"\xff\xfe": "UTF-16 text (save it as UTF-8)", b"\xfe\xff": "UTF-16 text (save it as UTF-8)",
          b"PAR1": "a Parquet file (write its rows as JSON Lines, e.g. pandas' to_json(lines=True))"}


def parse_jsonl(path, quiet=False):
    r"""Read preference pairs from a JSON Lines file: one object per non-blank line, in one of three
    forms (lines may mix them; other fields are ignored). A UTF-8 byte-order mark and Windows line
    endings are accepted.
    1. Strings "prompt", "chosen" and "rejected", taken as they are:
        {"prompt": "12+30=", "chosen": "2+0=2; 1+3=4; answer 42", "rejected": "2+0=3; 1+3=4; answer 42"}
    2. Strings "chosen" and "rejected" only, two full texts whose shared beginning is the prompt
       (Anthropic HH; see split_shared_prompt):
        {"chosen": "Human: 2+2? Assistant: It is 4", "rejected": "Human: 2+2? Assistant: It is 5"}
        -> prompt "Human: 2+2? Assistant: It is", chosen " 4", rejected " 5"
    3. Lists of messages (conversational, as in TRL), with or without "prompt" (see
       split_conversation); "system" messages are allowed:
        {"prompt": [{"role": "user", "content": "2+2?"}],
         "chosen": [{"role": "assistant", "content": "It is 4."}],
         "rejected": [{"role": "assistant", "content": "It is 5."}]}
        -> prompt "\n\nHuman: 2+2?\n\nAssistant:", chosen " It is 4.", rejected " It is 5."
        {"chosen": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "It is 4."}],
         "rejected": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "It is 5."}]}
        -> the same

    Args:
        path: the file.
        quiet: print no warning. (Lines without "prompt" whose chosen and rejected share no
            beginning get an empty prompt, which is counted and warned about.)
    Returns:
        (records, n_identical): a list of dicts with string fields prompt, chosen and rejected,
        and how many pairs were skipped because chosen and rejected were the same (they carry no
        preference).
    Raises:
        DataError "path:line: what is wrong" for the first bad line, or for a file with no pairs.
    """
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise DataError(f"{path}: cannot read the data file ({e.strerror})") from None
    for magic, what in PACKED.items():  # a file that is not text: say what it is
        if raw.startswith(magic):
            raise DataError(f"{path}: not JSON Lines text but {what}")
    # Windows (\r\n) and old Mac (\r) line endings: JSON strings hold no raw \r, so each is a line end
    raw_lines = raw.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
    records, n_identical, n_no_prompt, n_no_boundary = [], 0, 0, 0
    for lineno, raw in enumerate(raw_lines, start=1):
        where = f"{path}:{lineno}"
        if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        try:
            line = raw.decode("utf-8").strip()
        except UnicodeDecodeError as e:
            raise DataError(f"{where}: not valid UTF-8 (byte {e.start}); save the file as UTF-8") from None
        if not line:
            continue
        # a JSON array, or an object spread over several lines, is JSON but not JSON Lines
        hint = ("; the format is JSON Lines: one object per line, no enclosing [ ]"
                if line == "{" or line.startswith("[") else "")
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno}){hint}") from None
        if not isinstance(obj, dict):
            raise DataError(f"{where}: expected a JSON object with prompt, chosen, rejected{hint}")
        try:
            record = record_from_json(obj)
        except DataError as e:
            raise DataError(f"{where}: {e}") from None
        if record is None:
            n_identical += 1
        else:
            records.append(record)
            if "prompt" not in obj and not record["prompt"]:  # nothing shared, or no boundary in it
                shares = record["chosen"][:1] == record["rejected"][:1]
                n_no_boundary, n_no_prompt = n_no_boundary + shares, n_no_prompt + (not shares)
    if not records and n_identical:
        raise DataError(f"{path}: no preference pairs in the file: all {n_identical} were skipped "
                        f"because their chosen equals their rejected")
    if not records:
        raise DataError(f"{path}: no preference pairs in the file")
    if n_no_boundary and not quiet:
        print(f"warning: {path}: {n_no_boundary} of {len(records)} pairs have no \"prompt\" and chosen and "
              f"rejected texts whose shared beginning has no word or token boundary to end a prompt at, so "
              f"their prompt is empty; give those lines a \"prompt\" field")
    if n_no_prompt and not quiet:
        print(f"warning: {path}: {n_no_prompt} of {len(records)} pairs have no \"prompt\" and chosen and "
              f"rejected texts that share no beginning, so their prompt is empty; give those lines a "
              f"\"prompt\" field")
    return records, n_identical
