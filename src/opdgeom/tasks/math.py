"""Arithmetic chains with worked steps: the default domain of the tiny study.

Short enough for a character-level transformer with hidden size 64-128 to learn on a CPU in
a few hundred steps, yet with an answer a verifier can check exactly.

    prompt      "Q: 7+3-4=?\\nA: "
    completion  "7+3=10;10-4=6 #### 6"

The chain is evaluated strictly left to right, without operator precedence: "2+3*4" is
(2+3)*4 = 20, so every worked step applies one operator to the previous result and the
next operand, exactly as the completion writes it.
"""

import operator
import random

from opdgeom.tasks.base import ANSWER_MARK, Example, Task

OPERATORS = {"+": operator.add, "-": operator.sub, "*": operator.mul}


class MathTask(Task):
    """Chains of `n_ops` operators over operands drawn from 1..`max_operand`.

    Zero is left out of the operands so that no chain collapses to 0 through a single "*0".
    """

    name = "math"

    def __init__(self, n_ops: int = 2, max_operand: int = 9):
        if n_ops < 1:
            raise ValueError(f"MathTask needs n_ops >= 1, got {n_ops}")
        if max_operand < 1:
            raise ValueError(f"MathTask needs max_operand >= 1, got {max_operand}")
        self.n_ops = n_ops
        self.max_operand = max_operand

    @property
    def num_prompts(self) -> int:
        return self.max_operand ** (self.n_ops + 1) * len(OPERATORS) ** self.n_ops

    def sample(self, rng: random.Random) -> Example:
        operands = [rng.randint(1, self.max_operand) for _ in range(self.n_ops + 1)]
        symbols = [rng.choice(list(OPERATORS)) for _ in range(self.n_ops)]
        return worked_chain(operands, symbols)


def worked_chain(operands: list[int], symbols: list[str]) -> Example:
    """The example for one chain: prompt, one "a op b=c" step per operator, then the answer."""
    expression = str(operands[0]) + "".join(s + str(x) for s, x in zip(symbols, operands[1:]))
    steps = []
    value = operands[0]
    for symbol, operand in zip(symbols, operands[1:]):
        result = OPERATORS[symbol](value, operand)
        steps.append(f"{value}{symbol}{operand}={result}")
        value = result
    return Example(
        prompt=f"Q: {expression}=?\nA: ",
        completion=f"{';'.join(steps)} {ANSWER_MARK} {value}",
        answer=str(value),
    )
