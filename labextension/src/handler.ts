/**
 * The edge to the notebook server: the NSML API the server forwards under `{base}nsml/api/`
 * (with the server's own token: the browser holds none) and the one event stream it serves.
 */
import { PageConfig, URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';

import { IApi, StreamEvent, classifyStreamEvent } from './model';

/** The forwarder's prefix under the server's base URL. */
export const API_PREFIX = 'nsml/api';
/** The server-sent-event stream, one per notebook server (fanned out by the server). */
export const STREAM_PATH = 'nsml/stream';

/** An answer from the service that was not a success: its status and message. */
export class NSMLError extends Error {
  constructor(
    readonly status: number,
    message: string,
    readonly reason: string | null = null
  ) {
    super(message);
  }
}

/** Call `{base}nsml/api/<path>` (XSRF and the server's auth as any JupyterLab request). */
export async function requestAPI<T>(path: string, init: RequestInit = {}): Promise<T> {
  const settings = ServerConnection.makeSettings();
  const url = URLExt.join(settings.baseUrl, API_PREFIX, path);
  let response: Response;
  try {
    response = await ServerConnection.makeRequest(url, init, settings);
  } catch (error) {
    throw new ServerConnection.NetworkError(error as TypeError);
  }
  const text = await response.text();
  let data: any = null;
  if (text) {
    try {
      data = JSON.parse(text);
    } catch {
      data = text;
    }
  }
  if (!response.ok) {
    const message =
      (data && typeof data === 'object' && (data.message || data.detail)) ||
      (typeof data === 'string' && data.slice(0, 200)) ||
      response.statusText;
    throw new NSMLError(
      response.status,
      `${message} (HTTP ${response.status})`,
      data?.reason ?? null
    );
  }
  return data as T;
}

/** The {@link IApi} the model uses, over {@link requestAPI}. */
export const serverApi: IApi = {
  get: <T>(path: string) => requestAPI<T>(path),
  post: <T>(path: string, body?: unknown) =>
    requestAPI<T>(path, {
      method: 'POST',
      body: JSON.stringify(body ?? {}),
      headers: { 'Content-Type': 'application/json' }
    }),
  del: async (path: string) => {
    await requestAPI<unknown>(path, { method: 'DELETE' });
  }
};

/** Raw bytes up: a dataset upload's pack or blob (PUT/POST with an octet-stream body). */
export async function sendBytes<T>(
  path: string,
  method: 'PUT' | 'POST',
  body: Blob | ArrayBuffer
): Promise<T> {
  return requestAPI<T>(path, {
    method,
    body,
    headers: { 'Content-Type': 'application/octet-stream' }
  });
}

/**
 * A cookie's value; the last of duplicates, as tornado reads them (and as JupyterLab's
 * `ServerConnection` picks the XSRF value it sends).
 */
export function lastCookie(name: string, cookies: string = document.cookie): string | undefined {
  let value: string | undefined;
  for (const part of cookies.split(';')) {
    const p = part.trim();
    if (p.startsWith(name + '=')) {
      value = p.slice(name.length + 1);
    }
  }
  return value;
}

/**
 * The one event stream: an `EventSource` on the server's stream, reconnecting with a
 * backoff when it closes, handing each classified event to `onEvent`.
 */
export class EventStream {
  constructor(
    private readonly onEvent: (event: StreamEvent) => void,
    private readonly onLive: (live: boolean) => void
  ) {}

  start(): void {
    if (this._source || this._disposed) {
      return;
    }
    const settings = ServerConnection.makeSettings();
    // EventSource sends no headers of its own: the XSRF value (JupyterHub's single-user
    // servers ask it of every cookie-authenticated API request, GET included) and a token,
    // if the page has one, go in the query.
    const query = new URLSearchParams();
    const xsrf = lastCookie('_xsrf');
    if (xsrf !== undefined) {
      query.set('_xsrf', xsrf);
    }
    const token = PageConfig.getToken();
    if (token) {
      query.set('token', token);
    }
    const q = query.toString();
    const url = URLExt.join(settings.baseUrl, STREAM_PATH) + (q ? `?${q}` : '');
    const source = new EventSource(url, { withCredentials: true });
    this._source = source;
    const handle = (name: string) => (e: MessageEvent) => {
      let data: unknown = null;
      try {
        data = JSON.parse(e.data);
      } catch {
        data = null;
      }
      const event = classifyStreamEvent(name, data);
      if (event) {
        this.onEvent(event);
      }
    };
    for (const name of [
      'message',
      'session',
      'submission',
      'credit',
      'credits',
      'status',
      'reset'
    ]) {
      source.addEventListener(name, handle(name) as EventListener);
    }
    source.onopen = () => {
      this._delay = 1000;
      this.onLive(true);
      this.onEvent({ kind: 'hello' });
    };
    source.onerror = () => {
      this.onLive(false);
      if (source.readyState === EventSource.CLOSED) {
        this._source = null;
        this._timer = window.setTimeout(() => this.start(), this._delay);
        this._delay = Math.min(this._delay * 2, 60000);
      }
    };
  }

  stop(): void {
    window.clearTimeout(this._timer);
    this._source?.close();
    this._source = null;
    this.onLive(false);
  }

  dispose(): void {
    this._disposed = true;
    this.stop();
  }

  private _source: EventSource | null = null;
  private _timer = 0;
  private _delay = 1000;
  private _disposed = false;
}
