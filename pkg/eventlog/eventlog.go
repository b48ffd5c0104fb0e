// Package eventlog writes portguard's events as JSON lines through log/slog: the plugin's
// takeover, refusal and GC events (stderr and its logFile), portguardctl repair's removals
// and the node agent's log. Every line has the keys
//
//	time   RFC 3339 with nanoseconds, UTC ("2026-11-30T01:55:11.431913349Z")
//	level  "INFO", "WARN" or "ERROR"
//	msg    the event name again, for readers that show slog's message
//	event  the event name: "takeover", "refused", "gc", "repair", "pass", "removed", ...
//
// followed by the event's own fields (docs/verbs.md, docs/operating.md, README "Running
// the agent"). The agent counts the plugin's lines by their event key.
package eventlog

import (
	"context"
	"io"
	"log/slog"
	"os"
	"time"
)

// New returns a logger writing JSON lines to w. Each record is one Write of one whole line,
// so lines appended to a file opened O_APPEND by concurrent processes never interleave.
func New(w io.Writer) *slog.Logger {
	return slog.New(slog.NewJSONHandler(w, &slog.HandlerOptions{ReplaceAttr: utc}))
}

// utc writes the time in UTC, as the documented examples show it.
func utc(groups []string, a slog.Attr) slog.Attr {
	if len(groups) == 0 && a.Key == slog.TimeKey && a.Value.Kind() == slog.KindTime {
		return slog.String(slog.TimeKey, a.Value.Time().UTC().Format(time.RFC3339Nano))
	}
	return a
}

// Event logs one event at level: msg and the event key are both name.
func Event(l *slog.Logger, level slog.Level, name string, attrs ...slog.Attr) {
	l.LogAttrs(context.Background(), level, name, append([]slog.Attr{slog.String("event", name)}, attrs...)...)
}

// ToStderrAndFile logs one event to stderr and, when file is set, appends it to file (opened
// for this one line: the plugin is a short-lived process, and a log rotated meanwhile is
// re-created). A file that cannot be opened is reported on stderr; the event is not lost
// from stderr.
func ToStderrAndFile(file string, level slog.Level, name string, attrs ...slog.Attr) {
	w := io.Writer(os.Stderr)
	if file != "" {
		f, err := os.OpenFile(file, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
		if err != nil {
			Event(New(os.Stderr), slog.LevelError, "error", slog.String("error", "logFile: "+err.Error()))
		} else {
			defer f.Close()
			w = io.MultiWriter(os.Stderr, f)
		}
	}
	Event(New(w), level, name, attrs...)
}
