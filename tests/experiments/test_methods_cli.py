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


def test_builtin_methods_are_lazy_entries_that_resolve():
    from lightning_gradsim.baselines import GradNorm, PCGrad, UncertaintyWeighting
    from lightning_gradsim.methods import BUILTIN_METHODS

    assert set(BUILTIN_METHODS) == {"uncertainty", "gradnorm", "dwa", "rlw"}  # pcgrad is a rule
    assert isinstance(make_gate("uncertainty", aux_tasks=["a"]).loss_weighting, UncertaintyWeighting)
    assert isinstance(make_gate("gradnorm").loss_weighting, GradNorm)
    assert isinstance(make_gate("pcgrad").rule, PCGrad)
    for name in ("gradnorm", "pcgrad"):
        with pytest.raises(ValueError, match="already exists"):
            register_method(name)(lambda **kw: None)


def test_cli_lists_commands_and_rejects_unknown(capsys):
    assert cli.main([]) == 0
    assert "usage: gradsim" in capsys.readouterr().out
    assert cli.main(["no-such-command"]) == 2
    assert "unknown command" in capsys.readouterr().err


def test_cli_names_the_extra_when_a_command_lacks_a_dependency(capsys, monkeypatch, tmp_path):
    (tmp_path / "gradsim_needs_missing.py").write_text(
        "import no_such_dependency_xyz\n\ndef main(argv):\n    return 0\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli.COMMANDS, "needy", ("gradsim_needs_missing:main", "test command"))
    assert cli.main(["needy"]) == 2
    err = capsys.readouterr().err
    # a command from elsewhere: the package is named (no extra of ours is guessed for it)
    assert "needs 'no_such_dependency_xyz', which is not installed: pip install no_such_dependency_xyz" in err
