from meunet import __version__


def test_version(cli):
    result = cli("version")
    assert result.exit_code == 0
    assert __version__ in result.stdout
