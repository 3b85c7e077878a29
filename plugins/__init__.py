"""The built-in plugins. Each module is one plugin, named in recipes by its module name,
and uses only the public API of `framework` (as a third-party plugin would)."""
