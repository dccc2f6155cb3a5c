"""Method registry and the CLI dispatcher."""

import pytest

from lightning_gradsim import GradientGate, cli
from lightning_gradsim.methods import list_methods, make_gate, register_method


def test_every_rule_is_a_method_and_factories_register():
    for name in ["unweighted", "weighted", "projection", "sum", "main_only"]:
        assert name in list_methods()
        gate = make_gate(name, aux_weight=0.5)
        assert isinstance(gate, GradientGate) and gate.rule_name == name and gate.aux_weight == 0.5

    @register_method("test_smoothed_unweighted")
    def smoothed(**kwargs):
        return GradientGate(rule="unweighted", cosine_ema=0.9, **kwargs)

    assert make_gate("test_smoothed_unweighted").cosine_ema == 0.9
    with pytest.raises(ValueError, match="already exists"):
        register_method("unweighted")(smoothed)
    with pytest.raises(ValueError, match="Unknown method 'nope'"):
        make_gate("nope")


def test_cli_lists_commands_and_rejects_unknown(capsys):
    assert cli.main([]) == 0
    assert "usage: gradsim" in capsys.readouterr().out
    assert cli.main(["no-such-command"]) == 2
    assert "unknown command" in capsys.readouterr().err
