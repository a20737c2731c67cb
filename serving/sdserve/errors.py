"""The one error type a bad request raises: it names the field at fault."""


class RequestError(ValueError):
    """A request input is missing, malformed or out of its limits.

    The message always starts with the field's name, so a designer (or the client
    layer) can tell which input to fix: "gen_args.num_inference_steps: must be ...".
    """

    def __init__(self, field: str, problem: str):
        self.field = field
        self.problem = problem
        super().__init__(f"{field}: {problem}")
