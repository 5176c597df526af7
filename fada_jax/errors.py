"""Errors a user can cause and fix: reported as one line, without a traceback."""


class UserError(Exception):
  """A foreseeable mistake in the input (a path, a file, a config value).

  The message names the file, key or value at fault; `fada_jax.main` prints it on one
  line and exits with status 2.
  """
