package engine

import (
	"fmt"

	"github.com/sealdisk/sealdisk/internal/zeros"
	"github.com/sealdisk/sealdisk/sector"
	"github.com/sealdisk/sealdisk/store/storetest"
)

func dumpSector(im *testImage, st *storetest.Crash, lba uint64) string {
	c, _ := sector.NewCipher(im.b.Suite, im.key, im.b.UUID, int(im.h.SectorSize))
	defer c.Destroy()
	out := ""
	hdr := make([]byte, sector.JournalHeaderSize)
	st.ReadAt(hdr, int64(im.h.JournalOffset))
	ep, err := c.ParseJournalHeader(hdr)
	out += fmt.Sprintf("journal epoch %d err %v\n", ep, err)
	var e sector.Entry
	st.ReadAt(e[:], im.h.EntryPos(lba))
	ss := int(im.h.SectorSize)
	ct := make([]byte, ss)
	st.ReadAt(ct, im.h.DataPos(lba))
	pt := make([]byte, ss, ss+16)
	out += fmt.Sprintf("entry ctr %d zero %v; data zero %v; open %v\n", e.Counter(), e.IsZero(), zeros.All(ct), c.Open(lba, pt, ct, &e))
	buf := make([]byte, sector.JournalRecordSize)
	for i := uint64(0); i < 300; i++ {
		st.ReadAt(buf, int64(im.h.JournalOffset)+sector.JournalHeaderSize+int64(i)*sector.JournalRecordSize)
		r, err := c.ParseJournalRecord(buf)
		if i < 70 {
			out += fmt.Sprintf("[%d: ep %d seq %d ok %v] ", i, r.Epoch, r.Seq, err == nil)
		}
		if err != nil {
			continue
		}
		if r.LBA == lba {
			out += fmt.Sprintf("rec %d epoch %d seq %d kind %d new ctr %d old ctr %d; new opens %v old opens %v\n", i, r.Epoch, r.Seq, r.Kind, r.New.Counter(), r.Old.Counter(), c.Open(lba, pt, ct, &r.New), c.Open(lba, pt, ct, &r.Old))
		}
	}
	return out
}
