"""A user's training project: the folder that holds the code, the script a node runs in it (a
file, or `-m pkg.module`), its dependency file, the torch a node installs for it (with the torch
family's versions that go with it), and the files that ship. The stack, the local cluster, the
rehearsal and the node's install step all take a project from here.

    errors.py        ProjectError (a bad project or script setting), DependencyError
    dependencies.py  the dependency files as a node installs them; the install step's CLI
                     (`python -m training_project.dependencies`); standard library only
    torch_family.py  the torch family rule (torchvision, torchaudio); standard library only
    torch_pins.py    the torch a node installs for a project, checked with packaging
    shipping.py      the files that ship (.gitignore, caches, venvs left out) and their size
    load.py          Project and load_project: the folder and script checked as a whole

The payload ships this package beside userdata/ (under training_project/): a node runs only
dependencies.py, torch_family.py and errors.py, in a venv that holds nothing else yet, so they
and this file import nothing outside the standard library. The rest runs on the user's machine.
"""
