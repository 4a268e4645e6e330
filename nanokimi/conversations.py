"""Conversations read from files and datasets, for `prepare chat`: OpenAI's `messages` form (system / user /
assistant / tool messages, assistant `tool_calls`, `tool_call_id`, an optional `tools` list beside them) and ShareGPT's
`conversations` form (`from` / `value`), one conversation per JSON Lines line, .json array element, Parquet row or
dataset record, streamed as corpus.py streams documents. Each is checked (a bad one is one line naming its file and
line) and normalised: ShareGPT turns become messages, text parts become strings, tool-call ids become Kimi's
`functions.NAME:INDEX` (as Moonshot's API renames them: the model expects that form) and a tool result is named after
the function it answers."""

from .chat_template import CALL_ID, check_conversation, content_text
from .errors import UserError

SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "model": "assistant",
    "system": "system",
    "tool": "tool",
}


class ConversationRecords:
    """How a record holds a conversation (corpus.TextRecords' counterpart): a `messages` or `conversations` list,
    and optionally `tools`."""

    plain_text = False
    fields = ("messages", "conversations", "tools")  # the Parquet columns read

    def document(self, record, where):
        """{"messages": [...], "tools": [...] or None}, checked and normalised."""
        if not isinstance(record, dict):
            raise UserError(
                f'{where} is not a JSON object: one conversation per record, e.g. {{"messages": '
                f'[{{"role": "user", "content": "..."}}, ...]}}'
            )
        if record.get("messages") is not None:
            messages = record["messages"]
        elif record.get("conversations") is not None:
            messages = from_sharegpt(record["conversations"], where)
        else:
            raise UserError(
                f'{where} has no "messages" (OpenAI form) or "conversations" (ShareGPT form) list '
                f"(it has: {', '.join(list(record)[:8]) or 'no field'})"
            )
        if isinstance(messages, list):  # Parquet gives every message every column of the file, absent ones None
            messages = [{k: v for k, v in m.items() if v is not None} if isinstance(m, dict) else m for m in messages]
        tools = record.get("tools")
        check_conversation(messages, where, tools)
        return {"messages": kimi_tool_ids(plain_content(messages)), "tools": tools or None}

    def no_column(self, path, names):
        return (
            f'{path} has no column "messages" or "conversations" (its columns: {", ".join(names[:8])}): '
            f"conversations come in OpenAI's messages or ShareGPT's conversations form"
        )


def from_sharegpt(turns, where):
    """ShareGPT's [{"from": "human", "value": "..."}, ...] as OpenAI messages."""
    if not isinstance(turns, list):
        raise UserError(f'{where}: "conversations" must be a list of {{"from", "value"}} turns')
    messages = []
    for number, turn in enumerate(turns, 1):
        if not isinstance(turn, dict) or "from" not in turn:
            raise UserError(f'{where}: turn {number} has no "from" (human, gpt or system)')
        role = SHAREGPT_ROLES.get(turn["from"])
        if role is None:
            raise UserError(
                f"{where}: turn {number} is from unknown role {turn['from']!r}: use human, gpt or "
                f"system (tool calls need the OpenAI messages form)"
            )
        messages.append({"role": role, "content": turn.get("value")})
    return messages


def plain_content(messages):
    """Text-part contents joined into strings (what the template prints)."""
    return [m | {"content": content_text(m)} if isinstance(m.get("content"), list) else m for m in messages]


def kimi_tool_ids(messages):
    """Tool-call ids as `functions.NAME:INDEX` (INDEX counting the conversation's calls), the tool results' ids
    following, and each tool result named after its function where it has no name."""
    renamed, names, index, out = {}, {}, 0, []
    for message in messages:
        if message["role"] == "assistant" and message.get("tool_calls"):
            calls = []
            for call in message["tool_calls"]:
                name = call["function"]["name"]
                new = (
                    call["id"]
                    if call["id"].startswith("functions.") and CALL_ID.match(call["id"])
                    else f"functions.{name}:{index}"
                )
                renamed[call["id"]], names[new] = new, name
                calls.append(call | {"id": new, "type": "function"})
                index += 1
            message = message | {"tool_calls": calls}
        elif message["role"] == "tool":
            new = renamed[message["tool_call_id"]]
            message = message | {"tool_call_id": new, "name": message.get("name") or names[new]}
        out.append(message)
    return out
