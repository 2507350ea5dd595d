# Static declarations for python/ferrogate/hooks.py, compiled in Cython's pure Python mode
# (see README.md beside this file). The .py stays the source of behaviour; this file only
# says which classes become extension types and which attributes and locals have C types.
#
# Attributes a plugin may set (method, path, status, body, ctx, ...) stay `object` so that
# any value the plain-Python module accepts is accepted here too. Typed attributes are the
# internal ones and those whose value the module itself always produces.

cimport cython

cdef dict _LOWER
cdef Py_ssize_t _LOWER_MAX


cdef class _Fields:
    cdef public list _items
    cdef public dict _dirty
    cdef public bint changed

    @cython.locals(dirty=dict)
    cpdef _touch(self, key)
    cpdef _key(self, name)
    cpdef list _fields(self)
    @cython.locals(field=list)
    cpdef get(self, name, default=*)
    cpdef list getall(self, name)
    cpdef add(self, name, value)
    @cython.locals(fields=list, found=bint, i=Py_ssize_t, field=list)
    cpdef bint _drop(self, key) except -1
    cpdef bint remove(self, name) except -1
    @cython.locals(found=bint, field=list)
    cpdef bint rename(self, old, new) except -1
    cpdef list items(self)
    @cython.locals(seen=dict, f=list)
    cpdef list keys(self)


cdef class Headers(_Fields):
    cdef public str _text
    cdef public list _extra
    cdef public bint _gone

    @cython.locals(key=object)
    cpdef _key(self, name)
    @cython.locals(items=list, text=str, dirty=dict, line=str, field=list, extra=list)
    cpdef list _fields(self)
    @cython.locals(needle=str)
    cpdef bint _holds(self, key) except -1
    @cython.locals(extra=list, kept=list)
    cpdef bint _take_extra(self, key) except -1
    @cython.locals(dirty=dict, needle=str, text=str, at=Py_ssize_t, end=Py_ssize_t,
                   field=list)
    cpdef get(self, name, default=*)
    @cython.locals(dirty=dict, needle=str, text=str, at=Py_ssize_t, end=Py_ssize_t,
                   out=list)
    cpdef list getall(self, name)
    @cython.locals(dirty=dict)
    cpdef add(self, name, value)
    @cython.locals(dirty=dict)
    cpdef bint remove(self, name) except -1
    @cython.locals(fields=list, dirty=dict, added=list, text=str, needle=str,
                   touched=Py_ssize_t)
    cpdef _wire(self)


cdef dict _NEEDLES

@cython.locals(needle=str)
cpdef str _needle(key)


cdef class Params(_Fields):
    cpdef str encode(self)


cdef class Request:
    cdef public object method
    cdef public object path
    cdef public object query
    cdef public Headers _headers
    cdef public Params _params
    cdef public object _body
    cdef public bint _body_set
    cdef public object _orig_method
    cdef public object _orig_path
    cdef public object _orig_query
    cdef public object request_id
    cdef public object client_ip
    cdef public object route
    cdef public object host
    cdef public object scheme
    cdef public object http_version
    cdef public object _span
    cdef public object consumer
    cdef public object credential
    cdef public object _orig_consumer
    cdef public object _orig_credential
    cdef public object ctx
    cdef public Response response
    cdef public object upstream
    cdef public object fallbacks
    cdef public object fallback_on
    cdef public object response_body_mode

    @cython.locals(params=Params, headers=Headers, query_changed=bint, method_changed=bint,
                   path_changed=bint)
    cpdef tuple _decision(self)


cdef class Response:
    cdef public object status
    cdef public Headers _headers
    cdef public object body
    cdef public object _orig_status
    cdef public object trailers
    cdef public object attempt
    cdef public object skipped

    @cython.locals(status_changed=bint)
    cpdef tuple _decision(self)


cdef class LogInfo:
    cdef public object status
    cdef public object bytes_sent
    cdef public object duration
    cdef public object upstream
    cdef public object error


cdef class PhaseStats:
    cdef public long long calls
    cdef public long long total_ns
    cdef public long long max_ns
    cdef public long long errors
    cdef public long long over_budget


cdef class Slot:
    cdef public object name
    cdef public object plugin
    cdef public object on_request
    cdef public object on_response
    cdef public object on_response_body
    cdef public object on_response_chunk
    cdef public object on_log
    cdef public object timeout
    cdef public long long budget_ns
    cdef public object on_over_budget
    cdef public object bypass_for_ns
    cdef public object bypassed_until
    cdef public dict stats

    @cython.locals(spent=cython.longlong, budget=cython.longlong, stats=PhaseStats)
    cpdef account(self, phase, request_id, long long start, long long end)


cdef class Chain:
    cdef public object route
    cdef public tuple request
    cdef public tuple response
    cdef public tuple body
    cdef public tuple chunk
    cdef public tuple log
    cdef public bint buffered
    cdef public bint streamable


cdef class Host:
    cdef public list chains
    cdef public object loop

    @cython.locals(req=Request)
    cpdef tuple request(self, Py_ssize_t chain, method, path, query, headers, body, meta)
    @cython.locals(resp=Response)
    cpdef response(self, Py_ssize_t chain, Request req, status, headers, attempt=*, skipped=*)
    @cython.locals(resp=Response)
    cpdef tuple response_body(self, Py_ssize_t chain, Request req, body, trailers=*)
    @cython.locals(resp=Response)
    cpdef response_chunk(self, Py_ssize_t chain, Request req, chunk, last)


@cython.locals(slot=Slot, start=cython.longlong, traced=bint, wall=cython.longlong)
cpdef tuple run_request(Chain chain, Request req)

cpdef tuple _early(Slot slot, Request req, answer)

@cython.locals(slot=Slot, start=cython.longlong, traced=bint, wall=cython.longlong)
cpdef tuple run_response(Chain chain, Request req, Response resp)

@cython.locals(slot=Slot, start=cython.longlong, traced=bint, wall=cython.longlong)
cpdef run_body(Chain chain, Request req, Response resp, body)

@cython.locals(slot=Slot, start=cython.longlong)
cpdef run_chunk(Chain chain, Request req, Response resp, chunk, last)

@cython.locals(slot=Slot, start=cython.longlong)
cpdef run_log(Chain chain, Request req, LogInfo info, loop=*)

@cython.locals(h=Headers, text=str)
cpdef Headers _wire_headers(blob)

@cython.locals(r=Response)
cpdef Response _wire_response(status, blob)

@cython.locals(req=Request)
cpdef Request _new_request(Chain chain, method, path, query, headers, body, meta)
