"""The built-in `calculator` tool of `nanokimi chat --tools calculator`: exact arithmetic on numbers with + - * / ** %
and parentheses, read by Python's own parser (ast) and evaluated node by node, never by eval: anything else (names,
calls, attributes) is refused, and sizes are bounded so that no expression can take long or fill memory."""

import ast
import json
import math
import operator
from fractions import Fraction

NAME = "calculator"
DEFINITION = {
    "type": "function",
    "function": {
        "name": NAME,
        "description": "Evaluate an arithmetic expression exactly: numbers, + - * / ** % and parentheses.",
        "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]},
    },
}
MAX_CHARS, MAX_DIGITS, MAX_EXPONENT = 200, 100, 1000
OPERATORS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
    ast.USub: operator.neg,
    ast.UAdd: operator.pos,
}


class CalculatorError(ValueError):
    pass


def calculate(expression):
    """The value of an arithmetic expression as text: an integer exactly, a fraction as a decimal (up to 12
    significant digits). A CalculatorError says what is wrong."""
    if not isinstance(expression, str) or not expression.strip():
        raise CalculatorError("give an arithmetic expression, e.g. 12*(3+4)")
    if len(expression) > MAX_CHARS:
        raise CalculatorError(f"expression longer than {MAX_CHARS} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except (SyntaxError, ValueError):
        raise CalculatorError(f"not an arithmetic expression: {expression!r}") from None
    value = evaluate(tree.body)
    if value.denominator == 1:
        return str(value.numerator)
    return f"{float(value):.12g}"


def evaluate(node):
    """A Fraction: exact for + - * / %; ** with an integer exponent."""
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        if not math.isfinite(node.value) or digits(Fraction(node.value)) > MAX_DIGITS:
            raise CalculatorError(f"numbers have at most {MAX_DIGITS} digits")
        return Fraction(node.value)
    if isinstance(node, ast.UnaryOp) and type(node.op) in OPERATORS:
        return OPERATORS[type(node.op)](evaluate(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in OPERATORS:
        left, right = evaluate(node.left), evaluate(node.right)
        if isinstance(node.op, (ast.Div, ast.Mod)) and right == 0:
            raise CalculatorError("division by zero")
        if isinstance(node.op, ast.Pow):
            if right.denominator != 1 or abs(right) > MAX_EXPONENT:
                raise CalculatorError(f"exponents must be whole numbers up to {MAX_EXPONENT}")
            if left == 0 and right < 0:
                raise CalculatorError("division by zero")
            size = max(math.log10(abs(left.numerator) or 1), math.log10(left.denominator)) * abs(int(right))
            if size > MAX_DIGITS:  # checked before the power is computed: 9**999999 would take long
                raise CalculatorError(f"result has more than {MAX_DIGITS} digits")
        value = OPERATORS[type(node.op)](left, right)
        if digits(value) > MAX_DIGITS:
            raise CalculatorError(f"result has more than {MAX_DIGITS} digits")
        return value
    raise CalculatorError("only numbers, + - * / ** %, and parentheses")


def digits(value):
    """About how many decimal digits the numerator or denominator of a Fraction has (its size)."""
    return max(len(str(abs(value.numerator))), len(str(value.denominator))) if value else 1


def call(arguments):
    """Run the tool on its call's arguments (a JSON string or object with "expression"): the result as the tool
    message's content, an error as "error: ..." (the model reads it; the chat goes on)."""
    try:
        args = json.loads(arguments) if isinstance(arguments, str) else arguments
        expression = args.get("expression") if isinstance(args, dict) else None
        return calculate(expression)
    except json.JSONDecodeError:
        return 'error: the arguments are not JSON, e.g. {"expression": "12*3"}'
    except (CalculatorError, OverflowError) as e:
        return f"error: {e}"
    except RecursionError:
        return "error: the expression is nested too deeply"
