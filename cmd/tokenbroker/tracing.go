package main

import (
	"context"
	"fmt"
	"log/slog"
	"strings"
	"time"

	"go.opentelemetry.io/contrib/instrumentation/google.golang.org/grpc/otelgrpc"
	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracegrpc"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracehttp"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/sdk/resource"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/trace"
	"go.opentelemetry.io/otel/trace/noop"
	"google.golang.org/grpc"
)

// tracing is OpenTelemetry tracing as the OTEL_* environment asks: a
// provider for the broker's upstream spans, the server's span per call,
// and a flush at shutdown. Off, the provider is a no-op and the server
// gets no stats handler, so calls cost what they cost without tracing.
type tracing struct {
	provider      trace.TracerProvider
	serverOptions []grpc.ServerOption
	shutdown      func()
}

// startTracing turns tracing on when OTEL_TRACES_EXPORTER is "otlp" or an
// OTLP endpoint is set (OTEL_EXPORTER_OTLP_ENDPOINT,
// OTEL_EXPORTER_OTLP_TRACES_ENDPOINT), unless OTEL_SDK_DISABLED is true or
// OTEL_TRACES_EXPORTER is "none". The exporter speaks OTLP over gRPC, or
// HTTP with OTEL_EXPORTER_OTLP_(TRACES_)PROTOCOL=http/protobuf; it, the
// sampler (OTEL_TRACES_SAMPLER) and the resource (OTEL_SERVICE_NAME,
// OTEL_RESOURCE_ATTRIBUTES; service.name defaults to tokenbroker) read the
// rest of the standard variables themselves. Callers' W3C traceparent is
// continued.
func startTracing(ctx context.Context, getenv func(string) string, log *slog.Logger) (*tracing, error) {
	off := &tracing{provider: noop.NewTracerProvider(), shutdown: func() {}}
	on, err := tracingWanted(getenv)
	if err != nil || !on {
		return off, err
	}
	protocol := protocolOf(getenv)
	exp, err := newExporter(ctx, protocol)
	if err != nil {
		return nil, err
	}
	res, err := resource.New(ctx,
		resource.WithAttributes(attribute.String("service.name", "tokenbroker"), attribute.String("service.version", versionLine())),
		resource.WithFromEnv(), resource.WithTelemetrySDK())
	if err != nil {
		log.Warn("tracing: resource from OTEL_RESOURCE_ATTRIBUTES is partly invalid", "error", err.Error())
	}
	tp := sdktrace.NewTracerProvider(sdktrace.WithBatcher(exp), sdktrace.WithResource(res))
	prop := propagation.TraceContext{}
	otel.SetTracerProvider(tp)
	otel.SetTextMapPropagator(prop)
	log.Info("tracing on: exporting spans over OTLP", "protocol", protocol)
	return &tracing{
		provider:      tp,
		serverOptions: []grpc.ServerOption{grpc.StatsHandler(otelgrpc.NewServerHandler(otelgrpc.WithTracerProvider(tp), otelgrpc.WithPropagators(prop)))},
		shutdown: func() {
			// Flush what the batcher holds, within bounds: a collector that
			// is down must not hold up the stop.
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			if err := tp.Shutdown(ctx); err != nil {
				log.Warn("tracing: spans not flushed at shutdown", "error", err.Error())
			}
		},
	}, nil
}

// tracingWanted reads whether the environment asks for traces.
func tracingWanted(getenv func(string) string) (bool, error) {
	if strings.EqualFold(strings.TrimSpace(getenv("OTEL_SDK_DISABLED")), "true") {
		return false, nil
	}
	switch exp := strings.TrimSpace(getenv("OTEL_TRACES_EXPORTER")); exp {
	case "none":
		return false, nil
	case "otlp":
		return true, nil
	case "":
		return getenv("OTEL_EXPORTER_OTLP_ENDPOINT") != "" || getenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") != "", nil
	default:
		return false, fmt.Errorf("OTEL_TRACES_EXPORTER=%q: only otlp and none are supported", exp)
	}
}

// protocolOf is the OTLP protocol the environment names: the traces
// variable first, then the general one; grpc by default.
func protocolOf(getenv func(string) string) string {
	for _, k := range []string{"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"} {
		if v := strings.TrimSpace(getenv(k)); v != "" {
			return v
		}
	}
	return "grpc"
}

func newExporter(ctx context.Context, protocol string) (sdktrace.SpanExporter, error) {
	switch protocol {
	case "grpc":
		return otlptracegrpc.New(ctx)
	case "http/protobuf":
		return otlptracehttp.New(ctx)
	}
	return nil, fmt.Errorf("OTLP protocol %q: only grpc and http/protobuf are supported", protocol)
}
