package agent

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"io/fs"
	"os"
	"syscall"
	"time"
)

// PluginLog follows the plugin's logFile (JSON lines, pkg/eventlog) like `tail -F`: from its
// end when the agent starts, then every line appended; a file renamed away or replaced
// (logrotate's create), or truncated in place (copytruncate), is followed to the new
// content, after the rest of the old file was read. Each line's event key is passed to
// OnEvent; a line that is not JSON or has no event is skipped.
type PluginLog struct {
	Path    string
	OnEvent func(event string)
	OnError func(error) // nil: errors are dropped

	f       *os.File
	ino     uint64
	off     int64
	partial []byte
	started bool
}

// Poll reads what was appended since the last call.
func (p *PluginLog) Poll() {
	if !p.started {
		p.started = true
		if p.open() == nil {
			// Count from now: what the plugin logged before the agent started is not news.
			if off, err := p.f.Seek(0, io.SeekEnd); err == nil {
				p.off = off
			}
		}
		return
	}
	if p.f == nil {
		if err := p.open(); err != nil {
			return // not there yet: read it from its start once it is
		}
	}
	p.drain()
	st, err := os.Stat(p.Path)
	switch {
	case err == nil && inode(st) != p.ino:
		// Rotated: the old file was read to its end above; the new one from its start.
		p.close()
		if p.open() == nil {
			p.drain()
		}
	case err == nil && st.Size() < p.off:
		// Truncated in place.
		p.off, p.partial = 0, nil
		if _, err := p.f.Seek(0, io.SeekStart); err == nil {
			p.drain()
		}
	case err != nil && !errors.Is(err, fs.ErrNotExist):
		p.report(err)
	}
}

// Run polls every interval until ctx ends.
func (p *PluginLog) Run(ctx context.Context, every time.Duration) {
	t := time.NewTicker(every)
	defer t.Stop()
	p.Poll()
	for {
		select {
		case <-ctx.Done():
			p.close()
			return
		case <-t.C:
			p.Poll()
		}
	}
}

func (p *PluginLog) open() error {
	f, err := os.Open(p.Path)
	if err != nil {
		if !errors.Is(err, fs.ErrNotExist) {
			p.report(err)
		}
		return err
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		p.report(err)
		return err
	}
	p.f, p.ino, p.off, p.partial = f, inode(st), 0, nil
	return nil
}

func (p *PluginLog) close() {
	if p.f != nil {
		p.f.Close()
		p.f = nil
	}
}

func (p *PluginLog) report(err error) {
	if p.OnError != nil {
		p.OnError(err)
	}
}

// drain reads the open file to its end and hands every whole line on.
func (p *PluginLog) drain() {
	buf := make([]byte, 64<<10)
	for {
		n, err := p.f.Read(buf)
		if n > 0 {
			p.off += int64(n)
			p.lines(buf[:n])
		}
		if err == io.EOF || n == 0 {
			return
		}
		if err != nil {
			p.report(err)
			return
		}
	}
}

func (p *PluginLog) lines(b []byte) {
	data := append(p.partial, b...)
	for {
		i := bytes.IndexByte(data, '\n')
		if i < 0 {
			break
		}
		var ev struct {
			Event string `json:"event"`
		}
		if json.Unmarshal(data[:i], &ev) == nil && ev.Event != "" && p.OnEvent != nil {
			p.OnEvent(ev.Event)
		}
		data = data[i+1:]
	}
	// A line the plugin is still writing: kept for the next read (bounded: a runaway line
	// without newline is dropped).
	if len(data) > 1<<20 {
		data = nil
	}
	p.partial = append([]byte(nil), data...)
}

func inode(st os.FileInfo) uint64 {
	if s, ok := st.Sys().(*syscall.Stat_t); ok {
		return s.Ino
	}
	return 0
}
