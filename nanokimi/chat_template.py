"""Kimi-K2's chat template: conversations (OpenAI `messages`) as token ids with a per-token loss mask, and the
assistant's replies read back into text and tool calls. One renderer serves `prepare chat`, `chat`, `encode_chat` and
export, which ships the same template as Jinja (templates/kimi_k2_chat.jinja) so that transformers'
`apply_chat_template` gives exactly these ids.

The version is pinned: Kimi-K2-Instruct's chat_template.jinja of September 2025 (Moonshot changed it several times in
2025; this is the text of the ModelScope mirror of moonshotai/Kimi-K2-Instruct, kept verbatim in alibaba/rtp-llm at
commit be512b9). A turn is `<|im_user|>NAME<|im_middle|>BODY<|im_end|>` (`<|im_assistant|>` for the assistant,
`<|im_system|>` for every other role), with no text between turns; tools are declared in a first
`<|im_system|>tool_declare` turn; an assistant's tool calls are
`<|tool_calls_section_begin|><|tool_call_begin|>functions.NAME:INDEX<|tool_call_argument_begin|>ARGUMENTS
<|tool_call_end|>...<|tool_calls_section_end|>`; a tool's result is `## Return of ID\\n    RESULT` in a turn named
after the tool. One difference from Kimi's tokenizer: the five tool-call tokens are special here too (Kimi's are
not), so that no text a user types can stand for them."""

import json
import re
from importlib import resources

from .errors import UserError, check_text

IM_SYSTEM, IM_USER, IM_ASSISTANT = "<|im_system|>", "<|im_user|>", "<|im_assistant|>"
IM_MIDDLE, IM_END = "<|im_middle|>", "<|im_end|>"
CALLS_BEGIN, CALLS_END = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"
CALL_BEGIN, CALL_ARGUMENTS, CALL_END = "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>"
CHAT_TOKENS = (
    IM_SYSTEM,
    IM_USER,
    IM_ASSISTANT,
    IM_MIDDLE,
    IM_END,
    CALLS_BEGIN,
    CALLS_END,
    CALL_BEGIN,
    CALL_ARGUMENTS,
    CALL_END,
)
DEFAULT_SYSTEM = "You are Kimi, an AI assistant created by Moonshot AI."
TEMPLATE_VERSION = "Kimi-K2-Instruct chat_template.jinja, September 2025"
ROLES = ("system", "user", "assistant", "tool")
GENERATION_PROMPT = ((IM_ASSISTANT, True), ("assistant", False), (IM_MIDDLE, True))


def jinja_template():
    """The template as transformers' Jinja text, for an exported tokenizer."""
    return resources.files("nanokimi").joinpath("templates/kimi_k2_chat.jinja").read_text()


def tool_json(value):
    """JSON as the template's `tojson` filter writes it in transformers (", " and ": " separators, non-ASCII kept)."""
    return json.dumps(value, ensure_ascii=False)


def content_text(message):
    """A message's content as the template prints it: a string, or the text of a list of text parts."""
    content = message.get("content")
    if isinstance(content, list):
        return "".join(part["text"] for part in content)
    return content or ""


def render(messages, tools=None, add_generation_prompt=False, first=0):
    """The conversation as pieces (text, special, trains): `special` for a chat token, `trains` for what the
    assistant writes (its replies and tool calls, each with its <|im_end|>) and nothing else. `messages` must be valid
    (check_conversation). With `first`, only messages[first:] (and the generation prompt): the turns a conversation
    adds to what is rendered already, which the rendering of the whole extends."""
    pieces = []

    def add(text, special=False, trains=False):
        if text:
            pieces.append((text, special, trains))

    if first == 0:
        header(add, messages, tools)
    for message in messages[first:]:
        turn(add, message)
    if add_generation_prompt:
        for text, special in GENERATION_PROMPT:
            add(text, special)
    return pieces


def header(add, messages, tools):
    """The tool declaration and, unless the conversation opens with one, Kimi's default system turn."""
    if tools:
        add(IM_SYSTEM, True)
        add("tool_declare")
        add(IM_MIDDLE, True)
        add("\n  # Tools\n  " + tool_json(tools))
        add(IM_END, True)
    if messages and messages[0]["role"] != "system":
        for text, special in (
            (IM_SYSTEM, True),
            ("system", False),
            (IM_MIDDLE, True),
            (DEFAULT_SYSTEM, False),
            (IM_END, True),
        ):
            add(text, special)


def turn(add, message):
    """One message: its role's token, name, <|im_middle|>, body and <|im_end|>."""
    role = message["role"]
    add({"user": IM_USER, "assistant": IM_ASSISTANT}.get(role, IM_SYSTEM), True)
    add(message.get("name") or role)
    add(IM_MIDDLE, True)
    trains = role == "assistant"
    if role == "assistant" and message.get("tool_calls"):
        add(content_text(message), trains=True)
        add(CALLS_BEGIN, True, True)
        for call in message["tool_calls"]:
            arguments = call["function"]["arguments"]
            add(CALL_BEGIN, True, True)
            add(call["id"], trains=True)
            add(CALL_ARGUMENTS, True, True)
            add(arguments if isinstance(arguments, str) else tool_json(arguments), trains=True)
            add(CALL_END, True, True)
        add(CALLS_END, True, True)
    elif role == "tool":
        add(f"## Return of {message['tool_call_id']}\n    {content_text(message)}")
    else:
        add(content_text(message), trains=trains)
    add(IM_END, True, trains)


def encode(tokenizer, messages, tools=None, add_generation_prompt=False, first=0):
    """(ids, trains): the token ids of the rendered conversation and, per id, whether the assistant wrote it. Text
    between two chat tokens is encoded as one string, as a tokenizer that splits on its special tokens first does, and
    a chat token's text inside a message stays text."""
    ids, trains = [], []
    special_ids = chat_token_ids(tokenizer)
    runs = []  # (text or special id, trains): adjacent text pieces joined
    for text, special, train in render(messages, tools, add_generation_prompt, first):
        if special:
            runs.append((special_ids[text], train))
        elif runs and isinstance(runs[-1][0], str):
            runs[-1] = (runs[-1][0] + text, runs[-1][1] or train)
        else:
            runs.append((text, train))
    texts = [run for run, _ in runs if isinstance(run, str)]
    encoded = iter(tokenizer.encode_batch(texts))
    for run, train in runs:
        piece = [run] if isinstance(run, int) else [int(i) for i in next(encoded)]
        ids += piece
        trains += [train] * len(piece)
    return ids, trains


def chat_token_ids(tokenizer):
    """{chat token: id} of a tokenizer that has all of them; else a UserError saying how to get them."""
    found = {token: tokenizer.special_token_id(token) for token in CHAT_TOKENS}
    missing = [token for token, i in found.items() if i is None]
    if missing:
        raise UserError(
            f"this tokenizer has no chat tokens ({', '.join(missing[:3])}, ...): it is a base model's; "
            f"prepare conversations with `nanokimi prepare chat` and finetune on them"
        )
    return found


def check_conversation(messages, where, tools=None):
    """The messages of one conversation, checked: a list of {role, content} objects with known roles, string (or
    text-part) content, tool calls with an id, a function name and arguments, and each tool message answering a call
    made before it. A UserError names `where` (file and line) and the problem."""
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: a conversation must be a non-empty list of messages")
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise UserError(
            f'{where}: "tools" must be a list of tool objects ({{"type": "function", "function": {{...}}}})'
        )
    calls = set()
    for number, message in enumerate(messages, 1):
        at = f"{where}: message {number}"
        if not isinstance(message, dict):
            raise UserError(f'{at} is not an object with "role" and "content"')
        role = message.get("role")
        if role is None:
            raise UserError(f'{at} has no "role" (one of {", ".join(ROLES)})')
        if role not in ROLES:
            raise UserError(f"{at} has unknown role {role!r}: use one of {', '.join(ROLES)}")
        if message.get("name") is not None and not isinstance(message["name"], str):
            raise UserError(f'{at}: "name" must be a string')
        check_content(message, role, at)
        if role == "assistant" and message.get("tool_calls") is not None:
            calls |= check_tool_calls(message["tool_calls"], at)
        if role == "tool":
            call = message.get("tool_call_id")
            if not isinstance(call, str):
                raise UserError(f'{at} is a tool result with no "tool_call_id": name the call it answers')
            if call not in calls:
                raise UserError(f"{at} answers tool call {call!r}, which no earlier assistant message made")
    return messages


def check_content(message, role, at):
    content = message.get("content")
    if content is None and role == "assistant" and message.get("tool_calls"):
        return
    if isinstance(content, list):
        for part in content:
            if not (
                isinstance(part, dict) and part.get("type", "text") == "text" and isinstance(part.get("text"), str)
            ):
                raise UserError(
                    f'{at}: content parts must be text ({{"type": "text", "text": "..."}}); '
                    f"images and other media are not supported"
                )
            check_text(part["text"], at, "text")
        return
    if not isinstance(content, str):
        raise UserError(f'{at}: "content" is {"missing" if content is None else type(content).__name__}, not a string')
    check_text(content, at, "content")


def check_tool_calls(tool_calls, at):
    """The ids of an assistant message's valid tool calls."""
    if not isinstance(tool_calls, list):
        raise UserError(f'{at}: "tool_calls" must be a list')
    ids = set()
    for call in tool_calls:
        function = call.get("function") if isinstance(call, dict) else None
        if not (
            isinstance(function, dict)
            and isinstance(function.get("name"), str)
            and function["name"]
            and isinstance(call.get("id"), str)
            and isinstance(function.get("arguments"), (str, dict))
        ):
            raise UserError(
                f'{at}: a tool call needs an "id" and a "function" with a "name" and '
                f'"arguments" (a JSON string or object)'
            )
        ids.add(call["id"])
    return ids


CALL = re.compile(
    re.escape(CALL_BEGIN)
    + r"\s*(?P<id>[^<]+?)\s*"
    + re.escape(CALL_ARGUMENTS)
    + r"(?P<arguments>.*?)"
    + re.escape(CALL_END),
    re.DOTALL,
)
CALL_ID = re.compile(r"^(?:functions\.)?(?P<name>[\w.\-]+):(?P<index>\d+)$")


def parse_reply(text):
    """An assistant reply as generated (up to, not including, <|im_end|>) -> an OpenAI assistant message: the text
    before the tool-call section as content, and each well-formed call `functions.NAME:INDEX` as a tool call."""
    content, _, section = text.partition(CALLS_BEGIN)
    message = {"role": "assistant", "content": content}
    calls = []
    for match in CALL.finditer(section.partition(CALLS_END)[0]):
        name = CALL_ID.match(match["id"])
        if name:
            calls.append(
                {
                    "id": match["id"],
                    "type": "function",
                    "function": {"name": name["name"], "arguments": match["arguments"].strip()},
                }
            )
    if calls:
        message["tool_calls"] = calls
    return message
