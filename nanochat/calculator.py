"""
The calculator tool the model calls between <|python_start|> and <|python_end|>.

calculate(expression) -> str | None evaluates a small, safe subset of Python: arithmetic on
int/float literals and a few string operations (enough for GSM8K's `48/2` and SpellingBee's
`"strawberry".count("r")`). The expression is parsed with ast.parse and the tree is walked here,
node by node, against a whitelist: user text is never given to eval/exec/compile-and-run, no
name is ever looked up, and no attribute is ever fetched from a user value. Every operation that
could blow up (powers, string repetition, str.replace, int size) is bounded *before* it is
computed, and a wall-clock budget is checked at every node, so a call always returns quickly.
Anything outside the whitelist, any error, any limit hit: None, quietly (never an exception),
because the engine runs this inside server threads on model output.

The whitelist and the output format are documented in docs/tools.md.
"""

import ast
import math
import re
import time
import warnings

MAX_EXPRESSION_CHARS = 1000   # longer tool calls are refused before parsing
MAX_DEPTH = 40                # nesting depth of the syntax tree
MAX_NODES = 2000              # syntax tree size
MAX_INT_DIGITS = 1000         # any integer, intermediate or final (also keeps str(int) cheap)
MAX_STR_CHARS = 10_000        # any string, intermediate or final
MAX_ARGS = 16                 # arguments of min/max and of string methods
TIME_LIMIT_S = 0.25           # wall-clock budget per call, checked at every node

_MAX_INT_BITS = int(MAX_INT_DIGITS * math.log2(10)) + 1

# string methods callable on a str value; each is fetched from the str type by this fixed name
_STR_METHODS = {
    "count", "find", "rfind", "index", "rindex", "startswith", "endswith",
    "upper", "lower", "capitalize", "title", "swapcase", "strip", "lstrip", "rstrip",
    "replace", "isalpha", "isdigit", "isalnum", "isupper", "islower", "isspace",
}
_FUNCTIONS = {"abs", "round", "min", "max", "sqrt", "len", "int", "float", "str"}

# "1,000" and "12,345,678" in a purely numeric expression are thousands separators
_THOUSANDS = re.compile(r"(?<![\d.,])\d{1,3}(?:,\d{3})+(?![\d,])")
_NUMERIC_CHARS = re.compile(r"[0-9.,+\-*/%() eE_]*")


# ast.parse warns (SyntaxWarning/DeprecationWarning) on model text like "5x" or "\\d"; those
# would spam a server's stderr. The filter matches only code parsed under our own filename
# (warnings.catch_warnings would be simpler but is not thread-safe).
_FILENAME = "<calculator>"
warnings.filterwarnings("ignore", module=re.escape(_FILENAME) + r"\Z")


class _Refuse(Exception):
    """Internal: the expression is outside the whitelist or over a limit."""


def _is_num(x):
    return type(x) is int or type(x) is float  # bool is an int subclass and is not allowed


def _check(x):
    """Bound every value the walker produces."""
    if type(x) is int:
        if x.bit_length() > _MAX_INT_BITS or len(str(abs(x))) > MAX_INT_DIGITS:
            raise _Refuse("integer too large")
    elif type(x) is float:
        if not math.isfinite(x):
            raise _Refuse("not a finite number")
    elif type(x) is str:
        if len(x) > MAX_STR_CHARS:
            raise _Refuse("string too long")
    elif type(x) is bool:
        pass  # only produced by str.startswith/isdigit/...; printed as True/False
    else:
        raise _Refuse("unsupported type")
    return x


def _pow(a, b):
    if not (_is_num(a) and _is_num(b)):
        raise _Refuse("** needs numbers")
    if type(a) is int and type(b) is int and b >= 0:
        if abs(a) > 1 and b * math.log2(abs(a)) > _MAX_INT_BITS:
            raise _Refuse("power too large")
        return a ** b
    # float (or negative int exponent): the result is a float; bound its magnitude first so
    # that a huge int exponent never reaches float conversion or a slow loop
    fa, fb = float(a), float(b)  # OverflowError for giant ints -> refused by the caller
    if fa == 0.0 and fb < 0:
        raise _Refuse("division by zero")
    if fa < 0 and fb != int(fb):
        raise _Refuse("complex result")
    if fa != 0.0 and fb * math.log10(abs(fa)) > 308:  # underflow to 0.0 is harmless
        raise _Refuse("float overflow")
    return fa ** fb


def _mul(a, b):
    if _is_num(a) and _is_num(b):
        if type(a) is int and type(b) is int and a.bit_length() + b.bit_length() > _MAX_INT_BITS + 1:
            raise _Refuse("product too large")
        return a * b
    # string repetition: check the size before building it
    if type(a) is int and type(b) is str:
        a, b = b, a
    if type(a) is str and type(b) is int:
        if b > 0 and len(a) * b > MAX_STR_CHARS:
            raise _Refuse("string too long")
        return a * b
    raise _Refuse("unsupported *")


def _binop(op, a, b):
    if isinstance(op, ast.Add):
        if type(a) is str and type(b) is str:
            if len(a) + len(b) > MAX_STR_CHARS:
                raise _Refuse("string too long")
            return a + b
        if _is_num(a) and _is_num(b):
            return a + b
        raise _Refuse("unsupported +")
    if isinstance(op, ast.Mult):
        return _mul(a, b)
    if isinstance(op, ast.Pow):
        return _pow(a, b)
    # the rest are numeric only (str % x would be printf-style formatting: refused)
    if not (_is_num(a) and _is_num(b)):
        raise _Refuse("numbers only")
    if isinstance(op, ast.Sub):
        return a - b
    if isinstance(op, ast.Div):
        return a / b
    if isinstance(op, ast.FloorDiv):
        return a // b
    if isinstance(op, ast.Mod):
        return a % b
    raise _Refuse("operator not allowed")


def _call_str_method(name, s, args):
    if name == "replace":
        if len(args) not in (2, 3) or type(args[0]) is not str or type(args[1]) is not str:
            raise _Refuse("replace(old, new[, count])")
        old, new = args[0], args[1]
        if len(new) > len(old):
            n = s.count(old)
            if len(args) == 3:
                if type(args[2]) is not int:
                    raise _Refuse("replace count must be an int")
                if args[2] >= 0:
                    n = min(n, args[2])
            if len(s) + n * (len(new) - len(old)) > MAX_STR_CHARS:
                raise _Refuse("string too long")
        return s.replace(*args)
    for a in args:
        if type(a) is not str and type(a) is not int:
            raise _Refuse("string method arguments must be str or int")
    # fetched from the str type by a whitelisted name, never from the user's value
    return getattr(str, name)(s, *args)


def _call_function(name, args):
    if name == "abs" and len(args) == 1 and _is_num(args[0]):
        return abs(args[0])
    if name == "sqrt" and len(args) == 1 and _is_num(args[0]):
        return math.sqrt(args[0])
    if name == "round" and 1 <= len(args) <= 2 and _is_num(args[0]):
        if len(args) == 2:
            # round(int, -n) computes 10**n: keep n small
            if type(args[1]) is not int or abs(args[1]) > 100:
                raise _Refuse("round digits")
        return round(*args)
    if name in ("min", "max") and 1 <= len(args) <= MAX_ARGS:
        if len(args) == 1 and type(args[0]) is str:
            return min(args[0]) if name == "min" else max(args[0])
        if len(args) >= 2 and (all(_is_num(a) for a in args) or all(type(a) is str for a in args)):
            return min(args) if name == "min" else max(args)
    if name == "len" and len(args) == 1 and type(args[0]) is str:
        return len(args[0])
    if name == "int" and len(args) == 1:
        if type(args[0]) is float:
            return int(args[0])
        if type(args[0]) is str and len(args[0]) <= 100:  # short digit strings only
            return int(args[0])
        if type(args[0]) is int:
            return args[0]
    if name == "float" and len(args) == 1 and (_is_num(args[0]) or (type(args[0]) is str and len(args[0]) <= 100)):
        return float(args[0])
    if name == "str" and len(args) == 1 and (_is_num(args[0]) or type(args[0]) is str):
        return str(args[0])
    raise _Refuse("call not allowed")


def _index(v):
    if v is None:
        return None
    if type(v) is not int:
        raise _Refuse("indices must be ints")
    return v


class _Walker:
    def __init__(self, deadline):
        self.deadline = deadline
        self.nodes = 0

    def eval(self, node, depth=0):
        self.nodes += 1
        if depth > MAX_DEPTH or self.nodes > MAX_NODES:
            raise _Refuse("expression too complex")
        if time.monotonic() > self.deadline:
            raise _Refuse("time limit")
        d = depth + 1
        if isinstance(node, ast.Constant):
            v = node.value
            if type(v) in (int, float, str):  # not bool, None, bytes, complex, Ellipsis
                return _check(v)
            raise _Refuse("literal not allowed")
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
            v = self.eval(node.operand, d)
            if not _is_num(v):
                raise _Refuse("unary needs a number")
            return _check(-v if isinstance(node.op, ast.USub) else +v)
        if isinstance(node, ast.BinOp):
            a = self.eval(node.left, d)
            b = self.eval(node.right, d)
            return _check(_binop(node.op, a, b))
        if isinstance(node, ast.Call):
            if node.keywords or len(node.args) > MAX_ARGS:
                raise _Refuse("keywords / too many arguments")
            if any(isinstance(a, ast.Starred) for a in node.args):
                raise _Refuse("starred arguments")
            f = node.func
            if isinstance(f, ast.Attribute) and f.attr in _STR_METHODS:
                s = self.eval(f.value, d)
                if type(s) is not str:
                    raise _Refuse("methods only on strings")
                args = [self.eval(a, d) for a in node.args]
                return _check(_call_str_method(f.attr, s, args))
            if isinstance(f, ast.Name) and f.id in _FUNCTIONS:
                args = [self.eval(a, d) for a in node.args]
                return _check(_call_function(f.id, args))
            raise _Refuse("call not allowed")
        if isinstance(node, ast.Subscript):
            s = self.eval(node.value, d)
            if type(s) is not str:
                raise _Refuse("indexing only on strings")
            sl = node.slice
            if isinstance(sl, ast.Slice):
                lo = _index(self.eval(sl.lower, d) if sl.lower is not None else None)
                hi = _index(self.eval(sl.upper, d) if sl.upper is not None else None)
                st = _index(self.eval(sl.step, d) if sl.step is not None else None)
                return _check(s[lo:hi:st])
            return _check(s[_index(self.eval(sl, d))])
        # names, attributes, lambdas, comprehensions, comparisons, f-strings, walrus, ...
        raise _Refuse(f"{type(node).__name__} not allowed")


def format_result(value):
    """How a result is shown to the model (see docs/tools.md)."""
    if type(value) is str:
        return value
    if type(value) is bool:
        return str(value)
    if type(value) is int:
        return str(value)
    x = float(value)
    if x == 0:
        return "0"
    if x.is_integer() and abs(x) < 1e16:
        return str(int(x))
    ax = abs(x)
    if 1e-6 <= ax < 1e16:
        # 10 significant digits (never dropping integer digits), trailing zeros stripped
        decimals = max(0, 9 - math.floor(math.log10(ax)))
        s = f"{x:.{decimals}f}"
        if "." in s:
            s = s.rstrip("0").rstrip(".")
        return "0" if s in ("-0", "") else s
    return f"{x:.10g}"


def _normalize(expression):
    expr = expression.strip()
    if expr.endswith("="):  # "48/2=" as in GSM8K's <<48/2=24>> annotations
        expr = expr[:-1].rstrip()
    if _NUMERIC_CHARS.fullmatch(expr):
        expr = _THOUSANDS.sub(lambda m: m.group(0).replace(",", ""), expr)
    return expr


def calculate(expression):
    """Evaluate a whitelisted arithmetic/string expression; the result as a string, or None."""
    try:
        if type(expression) is not str or len(expression) > MAX_EXPRESSION_CHARS:
            return None
        deadline = time.monotonic() + TIME_LIMIT_S
        expr = _normalize(expression)
        if not expr:
            return None
        tree = ast.parse(expr, filename=_FILENAME, mode="eval")
        value = _Walker(deadline).eval(tree.body)
        return format_result(value)
    except Exception:  # _Refuse, SyntaxError, ZeroDivisionError, OverflowError, ValueError, RecursionError, ...
        return None
