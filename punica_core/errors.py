"""The errors users see. Each names its cause; servers map them to HTTP statuses."""


class PunicaError(Exception):
    """Base class; `status` is the HTTP status a server answers with."""
    status = 500


class AdapterError(PunicaError):
    """An adapter that cannot be served: the message names the file and the cause."""
    status = 400


class UnknownAdapterError(PunicaError):
    status = 404


class AdapterInUseError(PunicaError):
    status = 409


class QueueFullError(PunicaError):
    status = 429


class PromptTooLongError(PunicaError):
    status = 413


class InvalidRequestError(PunicaError):
    status = 400


class RequestFailedError(PunicaError):
    """Raised to a caller whose request failed inside the engine (the others go on)."""
    status = 500
