"""Errors shared by the CLI and the runtime (kept apart so that neither imports the other)."""


class CliError(Exception):
    """Bad input that the user can fix; `moesafe` prints it on one line and exits 2."""


# Ray 2.59+ clusters started with `ray start` require a token unless RAY_AUTH_MODE=disabled.
TOKEN_HELP = ("the Ray cluster at {address} requires its authentication token: set RAY_AUTH_MODE=token, "
              "with the token in RAY_AUTH_TOKEN or ~/.ray/auth_token (`ray get-auth-token` on the head prints it)")
