import { Widget } from '@lumino/widgets';

import { IApi, sessionPath } from '../model';
import { ILogChunk } from '../tokens';

/** How often a followed log asks for more while its session runs (one viewer, one request). */
const FOLLOW_MS = 2000;

/**
 * A session's log in the main area: the last lines first, then whatever is appended while
 * the session runs (following the bottom unless the reader scrolled up), until it is complete.
 */
export class LogViewer extends Widget {
  constructor(
    private readonly api: IApi,
    readonly session: string
  ) {
    super();
    this.addClass('jp-NSML-log');
    this.title.label = `Log: ${session}`;
    this.title.closable = true;
    this._status = document.createElement('div');
    this._status.className = 'jp-NSML-logstatus';
    this._pre = document.createElement('pre');
    this._pre.setAttribute('aria-label', `Log of ${session}`);
    this.node.append(this._status, this._pre);
    void this._poll(true);
  }

  dispose(): void {
    window.clearTimeout(this._timer);
    super.dispose();
  }

  private async _poll(first: boolean): Promise<void> {
    if (this.isDisposed) {
      return;
    }
    const base = `sessions/${sessionPath(this.session)}/logs`;
    let chunk: ILogChunk;
    try {
      chunk = await this.api.get<ILogChunk>(
        first ? `${base}?tail=2000` : `${base}?offset=${this._offset}`
      );
    } catch (e) {
      this._status.textContent = `Cannot read the log: ${(e as Error).message}`;
      this._timer = window.setTimeout(() => void this._poll(first), FOLLOW_MS * 3);
      return;
    }
    const atBottom = this.node.scrollTop + this.node.clientHeight >= this.node.scrollHeight - 8;
    if (chunk.text) {
      this._pre.append(document.createTextNode(chunk.text));
    }
    this._offset = chunk.next_offset;
    this._status.textContent = chunk.complete
      ? `${this.session}: ended; the whole log is shown`
      : `${this.session}: following…`;
    this._status.dataset.complete = String(chunk.complete);
    if (atBottom || first) {
      this.node.scrollTop = this.node.scrollHeight;
    }
    if (!chunk.complete) {
      this._timer = window.setTimeout(() => void this._poll(false), FOLLOW_MS);
    }
  }

  private _pre: HTMLPreElement;
  private _status: HTMLDivElement;
  private _offset = 0;
  private _timer = 0;
}
