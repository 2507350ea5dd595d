"""A field authorization plugin of the kind users write: refuses large pages of users to
clients without a consumer, and tells the upstream which operation it got."""

import msgspec

from ferrogate import Request, Response
from ferrogate.graphql import Field, FieldAuthorizer, operation_of


class PageLimit(FieldAuthorizer):
    name = "t-page-limit"

    class Config(msgspec.Struct, forbid_unknown_fields=True):
        max_first: int = 5

    def authorize_field(self, req: Request, field: Field) -> bool | str:
        if field.coordinate in ("Query.users", "User.friends"):
            first = field.arguments.get("first")
            if isinstance(first, int) and first > self.config.max_first:
                return f"{field.coordinate}: at most {self.config.max_first} per page"
        return True

    def on_request(self, req: Request) -> Response | None:
        answer = super().on_request(req)
        op = operation_of(req)
        if answer is None and op is not None:
            req.headers["x-graphql-operation"] = f"{op.type} {op.name or '-'} {op.complexity}"
        return answer
