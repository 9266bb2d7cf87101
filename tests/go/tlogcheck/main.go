// Command tlogcheck verifies an Evidence Hub audit log with Go's own transparency-log packages
// (golang.org/x/mod/sumdb/note and golang.org/x/mod/sumdb/tlog), none of which Evidence Hub wrote.
//
// Usage: tlogcheck -vkey VKEY -dir DIR [-checks checks.json]
//
// DIR is the log as served under /v1/log/: DIR/checkpoint, DIR/tile/<L>/<N>[.p/<W>] and
// DIR/tile/entries/<N>[.p/<W>]. tlogcheck opens the checkpoint with the verifier key, reads the
// tree through tlog.TileHashReader (which checks every tile it loads against the signed root),
// recomputes the root with tlog.TreeHash, and checks every entry of every bundle against the
// verified level-0 hashes (the first and last of each bundle also with tlog.ProveRecord and
// CheckRecord). checks.json, if given, holds proofs made by Evidence Hub:
// inclusion proofs (tlog.CheckRecord), consistency proofs (tlog.CheckTree), earlier checkpoints
// that must be consistent with this one, and c2sp.org/tlog-proof@v1 receipts with their entries.
// It prints one line per check and exits 1 at the first failure.
package main

import (
	"bytes"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/mod/sumdb/note"
	"golang.org/x/mod/sumdb/tlog"
)

type inclusion struct {
	Index int64    `json:"index"`
	Size  int64    `json:"size"`
	Root  string   `json:"root"`
	Entry string   `json:"entry"`
	Proof []string `json:"proof"`
}

type consistency struct {
	Size1 int64    `json:"size1"`
	Size2 int64    `json:"size2"`
	Root1 string   `json:"root1"`
	Root2 string   `json:"root2"`
	Proof []string `json:"proof"`
}

type receipt struct {
	Proof string `json:"proof"`
	Entry string `json:"entry"`
}

type checks struct {
	Inclusion   []inclusion   `json:"inclusion"`
	Consistency []consistency `json:"consistency"`
	Earlier     []string      `json:"earlier_checkpoints"`
	Receipts    []receipt     `json:"receipts"`
}

// dirTiles serves tlog tiles from a C2SP tlog-tiles directory: tlog names a tile
// tile/8/<L>/<N>[.p/<W>]; C2SP drops the height element.
type dirTiles struct {
	dir   string
	cache map[tlog.Tile][]byte
}

func (d dirTiles) Height() int { return 8 }

func (d dirTiles) ReadTiles(tiles []tlog.Tile) ([][]byte, error) {
	out := make([][]byte, len(tiles))
	for i, t := range tiles {
		if data, ok := d.cache[t]; ok {
			out[i] = data
			continue
		}
		data, err := os.ReadFile(filepath.Join(d.dir, c2spPath(t)))
		if err != nil {
			return nil, err
		}
		out[i] = data
	}
	return out, nil
}

// SaveTiles is called by tlog only with tiles it has verified against the tree.
func (d dirTiles) SaveTiles(tiles []tlog.Tile, data [][]byte) {
	for i, t := range tiles {
		d.cache[t] = data[i]
	}
}

func c2spPath(t tlog.Tile) string {
	return "tile/" + strings.TrimPrefix(t.Path(), "tile/8/")
}

type tree struct {
	origin string
	size   int64
	root   tlog.Hash
}

func openCheckpoint(data []byte, verifier note.Verifier) (tree, error) {
	n, err := note.Open(data, note.VerifierList(verifier))
	if err != nil {
		return tree{}, err
	}
	lines := strings.Split(n.Text, "\n")
	if len(lines) < 4 {
		return tree{}, errors.New("checkpoint has fewer than three lines")
	}
	size, err := strconv.ParseInt(lines[1], 10, 64)
	if err != nil || size < 0 {
		return tree{}, fmt.Errorf("bad size %q", lines[1])
	}
	root, err := tlog.ParseHash(lines[2])
	if err != nil {
		return tree{}, err
	}
	if lines[0] != verifier.Name() {
		return tree{}, fmt.Errorf("origin %q is not the key name %q", lines[0], verifier.Name())
	}
	return tree{lines[0], size, root}, nil
}

func hashes(list []string) ([]tlog.Hash, error) {
	out := make([]tlog.Hash, len(list))
	for i, s := range list {
		h, err := tlog.ParseHash(s)
		if err != nil {
			return nil, err
		}
		out[i] = h
	}
	return out, nil
}

func bundle(dir string, n int64, width int) ([][]byte, error) {
	t := tlog.Tile{H: 8, L: 0, N: n, W: width}
	path := "tile/entries/" + strings.TrimPrefix(t.Path(), "tile/8/0/")
	data, err := os.ReadFile(filepath.Join(dir, path))
	if err != nil {
		return nil, err
	}
	var out [][]byte
	for len(data) > 0 {
		if len(data) < 2 {
			return nil, fmt.Errorf("%s: truncated", path)
		}
		l := int(binary.BigEndian.Uint16(data))
		if len(data) < 2+l {
			return nil, fmt.Errorf("%s: truncated", path)
		}
		out = append(out, data[2:2+l])
		data = data[2+l:]
	}
	if len(out) != width {
		return nil, fmt.Errorf("%s: %d entries, want %d", path, len(out), width)
	}
	return out, nil
}

// checkReceipt parses a c2sp.org/tlog-proof@v1 proof by hand and checks it with note and tlog.
func checkReceipt(r receipt, verifier note.Verifier) error {
	entry, err := base64.StdEncoding.DecodeString(r.Entry)
	if err != nil {
		return err
	}
	head, cp, ok := strings.Cut(r.Proof, "\n\n")
	if !ok {
		return errors.New("no blank line before the checkpoint")
	}
	lines := strings.Split(head, "\n")
	if lines[0] != "c2sp.org/tlog-proof@v1" {
		return errors.New("not a c2sp.org/tlog-proof@v1")
	}
	lines = lines[1:]
	if len(lines) > 0 && strings.HasPrefix(lines[0], "extra ") {
		lines = lines[1:]
	}
	if len(lines) == 0 || !strings.HasPrefix(lines[0], "index ") {
		return errors.New("no index line")
	}
	index, err := strconv.ParseInt(strings.TrimPrefix(lines[0], "index "), 10, 64)
	if err != nil {
		return err
	}
	proof, err := hashes(lines[1:])
	if err != nil {
		return err
	}
	t, err := openCheckpoint([]byte(cp), verifier)
	if err != nil {
		return err
	}
	return tlog.CheckRecord(proof, t.size, t.root, index, tlog.RecordHash(entry))
}

func run() error {
	vkey := flag.String("vkey", "", "the log's verifier key")
	dir := flag.String("dir", "", "the served log: checkpoint and tile/")
	checksPath := flag.String("checks", "", "proofs made by Evidence Hub to check (JSON)")
	flag.Parse()
	verifier, err := note.NewVerifier(*vkey)
	if err != nil {
		return fmt.Errorf("vkey: %w", err)
	}
	data, err := os.ReadFile(filepath.Join(*dir, "checkpoint"))
	if err != nil {
		return err
	}
	t, err := openCheckpoint(data, verifier)
	if err != nil {
		return fmt.Errorf("checkpoint: %w", err)
	}
	fmt.Printf("ok checkpoint %s size %d root %s (sumdb/note)\n", t.origin, t.size, t.root)

	reader := tlog.TileHashReader(tlog.Tree{N: t.size, Hash: t.root}, dirTiles{*dir, map[tlog.Tile][]byte{}})
	got, err := tlog.TreeHash(t.size, reader)
	if err != nil {
		return fmt.Errorf("tiles: %w", err)
	}
	if got != t.root {
		return fmt.Errorf("tiles hash to %s, checkpoint says %s", got, t.root)
	}
	fmt.Printf("ok tiles hash to the signed root (sumdb/tlog TileHashReader, TreeHash)\n")

	for start := int64(0); start < t.size; start += 256 {
		width := 256
		if t.size-start < 256 {
			width = int(t.size - start)
		}
		entries, err := bundle(*dir, start/256, width)
		if err != nil {
			return err
		}
		// Every entry against the level-0 hashes of the verified tiles (one tile read per bundle),
		// and the first and last entry of each bundle proved with ProveRecord/CheckRecord.
		indexes := make([]int64, len(entries))
		for i := range entries {
			indexes[i] = tlog.StoredHashIndex(0, start+int64(i))
		}
		leaves, err := reader.ReadHashes(indexes)
		if err != nil {
			return fmt.Errorf("tile of entries %d+: %w", start, err)
		}
		for i, e := range entries {
			index := start + int64(i)
			if tlog.RecordHash(e) != leaves[i] {
				return fmt.Errorf("entry %d does not hash to its leaf", index)
			}
			if i != 0 && i != len(entries)-1 {
				continue
			}
			proof, err := tlog.ProveRecord(t.size, index, reader)
			if err != nil {
				return fmt.Errorf("entry %d: %w", index, err)
			}
			if err := tlog.CheckRecord(proof, t.size, t.root, index, tlog.RecordHash(e)); err != nil {
				return fmt.Errorf("entry %d: %w", index, err)
			}
		}
	}
	fmt.Printf("ok %d entries from the entry bundles match the tree (ReadHashes; ProveRecord, CheckRecord per bundle)\n", t.size)

	if *checksPath == "" {
		return nil
	}
	raw, err := os.ReadFile(*checksPath)
	if err != nil {
		return err
	}
	var c checks
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&c); err != nil {
		return err
	}
	for _, in := range c.Inclusion {
		proof, err := hashes(in.Proof)
		if err != nil {
			return err
		}
		root, err := tlog.ParseHash(in.Root)
		if err != nil {
			return err
		}
		entry, err := base64.StdEncoding.DecodeString(in.Entry)
		if err != nil {
			return err
		}
		if err := tlog.CheckRecord(proof, in.Size, root, in.Index, tlog.RecordHash(entry)); err != nil {
			return fmt.Errorf("inclusion proof of entry %d in size %d: %w", in.Index, in.Size, err)
		}
	}
	fmt.Printf("ok %d inclusion proofs (CheckRecord)\n", len(c.Inclusion))
	for _, co := range c.Consistency {
		proof, err := hashes(co.Proof)
		if err != nil {
			return err
		}
		r1, err1 := tlog.ParseHash(co.Root1)
		r2, err2 := tlog.ParseHash(co.Root2)
		if err1 != nil || err2 != nil {
			return errors.New("bad root")
		}
		if err := tlog.CheckTree(proof, co.Size2, r2, co.Size1, r1); err != nil {
			return fmt.Errorf("consistency proof %d→%d: %w", co.Size1, co.Size2, err)
		}
	}
	fmt.Printf("ok %d consistency proofs (CheckTree)\n", len(c.Consistency))
	for _, text := range c.Earlier {
		old, err := openCheckpoint([]byte(text), verifier)
		if err != nil {
			return fmt.Errorf("earlier checkpoint: %w", err)
		}
		if old.size == 0 {
			continue // every tree extends the empty one; tlog has nothing to prove
		}
		proof, err := tlog.ProveTree(t.size, old.size, reader)
		if err != nil {
			return err
		}
		if err := tlog.CheckTree(proof, t.size, t.root, old.size, old.root); err != nil {
			return fmt.Errorf("checkpoint of size %d is not consistent with size %d: %w", old.size, t.size, err)
		}
	}
	fmt.Printf("ok %d earlier checkpoints consistent with this one (ProveTree, CheckTree)\n", len(c.Earlier))
	for i, r := range c.Receipts {
		if err := checkReceipt(r, verifier); err != nil {
			return fmt.Errorf("receipt %d: %w", i, err)
		}
	}
	fmt.Printf("ok %d tlog-proof receipts\n", len(c.Receipts))
	return nil
}

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "FAIL", err)
		os.Exit(1)
	}
}
