"""act's built-in model families: each subpackage implements act.core.family.ModelFamily for one model library, and is
the only place act imports that library. Registered in act/core/family.py (BUILTIN) by one lazy import string each."""
