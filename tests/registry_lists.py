"""The tests' lists of norms, read from the registry and from what each norm's cell says of
itself (a new norm joins the lists that fit it without an edit here)."""

from normrnn.compute.sequence import loop_form
from normrnn.methods.cells import CELLS
from normrnn.methods.norms import NORMS, Recurrence, uses_batch_norm

SEQUENCE_CELLS = [c for c in sorted(CELLS) if CELLS[c].has_sequence]


def batch_norms() -> list[str]:
    """The registered norms that keep batch statistics."""
    return [n for n in sorted(NORMS) if uses_batch_norm(n)]


def loop_norms(cell: str) -> list[str]:
    """The norms whose recurrence in ``cell`` the compiled loop runs whole, in training and
    in eval (each of its terms has a form there); not the plain cell's (the fused kernels)."""
    names = []
    for name in sorted(NORMS):
        layer = CELLS[cell](4, 8, norm=name, max_steps=3)
        forms = []
        for training in (True, False):
            rec = layer.train(training).norm.recurrence()
            plain = rec is None or rec == Recurrence()
            forms.append(not plain and loop_form(rec, 2, cell=cell == "lstm") is not None)
        if all(forms):
            names.append(name)
    return names


def loop_cases() -> list[tuple[str, str]]:
    """(cell, norm) for every sequence cell and each norm its loop runs."""
    return [(cell, norm) for cell in SEQUENCE_CELLS for norm in loop_norms(cell)]


def stepwise_norms() -> list[str]:
    """The activation norms whose terms step on the sequence path (``has_step``)."""
    names = []
    for name in sorted(NORMS):
        norm = NORMS[name](hidden_size=4, gates=4, max_steps=3)
        if getattr(norm, "x", None) is not None and norm.x.has_step and norm.h.has_step:
            names.append(name)
    return names
