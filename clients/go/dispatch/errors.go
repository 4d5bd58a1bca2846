package dispatch

import (
	"context"
	"errors"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Error is every failure of a call: the gRPC status Code and the server's Message.
//
// Its text reads "NOT_FOUND: conversation conv_x not found". Test for one status with
// errors.Is and a sentinel (errors.Is(err, dispatch.ErrNotFound)), or read the code with
// errors.As or [Code]. An Error is also a gRPC status (status.FromError and status.Code see
// it), and one with code CANCELED or DEADLINE_EXCEEDED matches context.Canceled or
// context.DeadlineExceeded under errors.Is.
type Error struct {
	Code    codes.Code
	Message string
}

// The sentinels, one per status the server answers with: errors.Is(err, ErrNotFound) holds
// for every *Error whose Code is codes.NotFound, whatever its message.
var (
	ErrCanceled           = &Error{Code: codes.Canceled}
	ErrUnknown            = &Error{Code: codes.Unknown}
	ErrInvalidArgument    = &Error{Code: codes.InvalidArgument}
	ErrDeadlineExceeded   = &Error{Code: codes.DeadlineExceeded}
	ErrNotFound           = &Error{Code: codes.NotFound}
	ErrAlreadyExists      = &Error{Code: codes.AlreadyExists}
	ErrPermissionDenied   = &Error{Code: codes.PermissionDenied}
	ErrResourceExhausted  = &Error{Code: codes.ResourceExhausted}
	ErrFailedPrecondition = &Error{Code: codes.FailedPrecondition}
	ErrAborted            = &Error{Code: codes.Aborted}
	ErrUnimplemented      = &Error{Code: codes.Unimplemented}
	ErrInternal           = &Error{Code: codes.Internal}
	ErrUnavailable        = &Error{Code: codes.Unavailable}
	ErrUnauthenticated    = &Error{Code: codes.Unauthenticated}
)

// codeNames are the statuses' canonical names, as the server and the other clients spell them.
var codeNames = map[codes.Code]string{
	codes.OK:                 "OK",
	codes.Canceled:           "CANCELLED",
	codes.Unknown:            "UNKNOWN",
	codes.InvalidArgument:    "INVALID_ARGUMENT",
	codes.DeadlineExceeded:   "DEADLINE_EXCEEDED",
	codes.NotFound:           "NOT_FOUND",
	codes.AlreadyExists:      "ALREADY_EXISTS",
	codes.PermissionDenied:   "PERMISSION_DENIED",
	codes.ResourceExhausted:  "RESOURCE_EXHAUSTED",
	codes.FailedPrecondition: "FAILED_PRECONDITION",
	codes.Aborted:            "ABORTED",
	codes.OutOfRange:         "OUT_OF_RANGE",
	codes.Unimplemented:      "UNIMPLEMENTED",
	codes.Internal:           "INTERNAL",
	codes.Unavailable:        "UNAVAILABLE",
	codes.DataLoss:           "DATA_LOSS",
	codes.Unauthenticated:    "UNAUTHENTICATED",
}

// CodeName is code's canonical name: "NOT_FOUND", "FAILED_PRECONDITION", "CANCELLED", ...
func CodeName(code codes.Code) string {
	if name, ok := codeNames[code]; ok {
		return name
	}
	return code.String()
}

func (e *Error) Error() string {
	if e.Message == "" {
		return CodeName(e.Code)
	}
	return CodeName(e.Code) + ": " + e.Message
}

// Is reports whether target is an *Error with the same Code (a sentinel, or any other), or the
// context error a CANCELLED or DEADLINE_EXCEEDED status stands for.
func (e *Error) Is(target error) bool {
	var other *Error
	if errors.As(target, &other) {
		return other.Code == e.Code
	}
	switch target {
	case context.Canceled:
		return e.Code == codes.Canceled
	case context.DeadlineExceeded:
		return e.Code == codes.DeadlineExceeded
	}
	return false
}

// GRPCStatus makes an *Error a gRPC status to status.FromError and status.Code.
func (e *Error) GRPCStatus() *status.Status {
	return status.New(e.Code, e.Message)
}

// Code is err's gRPC status code: codes.OK for nil, the code of an *Error or of any gRPC status
// error, codes.Canceled or codes.DeadlineExceeded for the context's errors, else codes.Unknown.
func Code(err error) codes.Code {
	if err == nil {
		return codes.OK
	}
	var e *Error
	if errors.As(err, &e) {
		return e.Code
	}
	return asError(err).Code
}

// asError is err as an *Error: a gRPC status keeps its code and message; the context's own
// errors are CANCELLED and DEADLINE_EXCEEDED; anything else is UNKNOWN.
func asError(err error) *Error {
	var e *Error
	if errors.As(err, &e) {
		return e
	}
	if s, ok := status.FromError(err); ok {
		return &Error{Code: s.Code(), Message: s.Message()}
	}
	switch {
	case errors.Is(err, context.Canceled):
		return &Error{Code: codes.Canceled, Message: err.Error()}
	case errors.Is(err, context.DeadlineExceeded):
		return &Error{Code: codes.DeadlineExceeded, Message: err.Error()}
	}
	return &Error{Code: codes.Unknown, Message: err.Error()}
}

// wrap is a call's error as an *Error (nil stays nil).
func wrap(err error) error {
	if err == nil {
		return nil
	}
	return asError(err)
}
