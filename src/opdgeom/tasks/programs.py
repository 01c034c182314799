"""Tiny straight-line programs: the second domain, for the data-domain variant of the study.

A program assigns a constant, derives new variables from earlier ones with one operator each,
then prints one more expression. The completion traces every variable's value, then the
printed value, then the answer:

    prompt      "Q: x=3;y=x*2;print(y+1)\\nA: "
    completion  "x=3;y=6;7 #### 7"

Every expression has a single operator, so Python's precedence never enters: the program
means exactly what `exec` would print.
"""

import operator
import random

from opdgeom.tasks.base import ANSWER_MARK, Example, Task

OPERATORS = {"+": operator.add, "-": operator.sub, "*": operator.mul}
VARIABLE_NAMES = "xyzabcdefghijk"


class ProgramTask(Task):
    """Programs of `n_assignments` assignments (the first a constant) and one print.

    Constants come from 1..`max_value`; each right-hand operand is a constant or an earlier
    variable, chosen uniformly from both together. Values grow quickly with "*": keep
    `n_assignments` small (default 2 keeps every answer within 4 digits).
    """

    name = "programs"

    def __init__(self, n_assignments: int = 2, max_value: int = 9):
        if not 1 <= n_assignments <= len(VARIABLE_NAMES):
            raise ValueError(f"ProgramTask needs 1 <= n_assignments <= {len(VARIABLE_NAMES)}, got {n_assignments}")
        if max_value < 1:
            raise ValueError(f"ProgramTask needs max_value >= 1, got {max_value}")
        self.n_assignments = n_assignments
        self.max_value = max_value

    @property
    def num_prompts(self) -> int:
        """Product over the choices: first constant, each derived assignment, the print."""
        count = self.max_value
        for n_earlier in range(1, self.n_assignments):
            count *= n_earlier * len(OPERATORS) * (self.max_value + n_earlier)
        n_vars = self.n_assignments
        return count * n_vars * len(OPERATORS) * (self.max_value + n_vars)

    def sample(self, rng: random.Random) -> Example:
        names = VARIABLE_NAMES[: self.n_assignments]
        first = rng.randint(1, self.max_value)
        statements = [f"{names[0]}={first}"]
        values = {names[0]: first}
        trace = [f"{names[0]}={first}"]
        for name in names[1:]:
            expression, value = self._binary_expression(rng, values)
            statements.append(f"{name}={expression}")
            values[name] = value
            trace.append(f"{name}={value}")
        expression, printed = self._binary_expression(rng, values)
        statements.append(f"print({expression})")
        trace.append(str(printed))
        return Example(
            prompt=f"Q: {';'.join(statements)}\nA: ",
            completion=f"{';'.join(trace)} {ANSWER_MARK} {printed}",
            answer=str(printed),
        )

    def _binary_expression(self, rng: random.Random, values: dict[str, int]) -> tuple[str, int]:
        """A random "ref op operand" over the defined variables, with its value."""
        ref = rng.choice(list(values))
        symbol = rng.choice(list(OPERATORS))
        operands = [str(c) for c in range(1, self.max_value + 1)] + list(values)
        operand = rng.choice(operands)
        operand_value = values[operand] if operand in values else int(operand)
        return f"{ref}{symbol}{operand}", OPERATORS[symbol](values[ref], operand_value)
