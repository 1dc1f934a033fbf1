"""haqjax experiment launchers (absl apps): `python -m experiments.<name>`."""
